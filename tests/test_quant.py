"""int8 weight-only mode: close to full precision, same greedy decisions on a model with margins."""

import torch

from januskit.quant import Int8Linear, quantize_int8


def test_int8_linear_matches_float():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128)
    q = Int8Linear(lin)
    x = torch.randn(5, 3, 256)
    ref = lin(x)
    err = (q(x) - ref).abs().max() / ref.abs().max()
    assert err < 0.02
    assert q.qweight.dtype == torch.int8 and q.qweight.element_size() * q.qweight.numel() == 256 * 128


def test_quantized_model_generates_close_to_full_precision(official_tiny_dir):
    from januskit import Janus

    full = Janus.from_pretrained(official_tiny_dir, dtype=torch.bfloat16)
    quant = Janus.from_pretrained(official_tiny_dir, dtype=torch.bfloat16)
    n = quantize_int8(quant.model)
    assert n == 3 * 7 + 2  # 7 linears per decoder block, 2 in the image head
    ids = torch.tensor([full.processor.generation_ids("a red circle")[0].tolist()])
    with torch.no_grad():
        a = full.model.gen_head(full.model.decoder(full.model.embed(ids)))[0, -1].float()
        b = quant.model.gen_head(quant.model.decoder(quant.model.embed(ids)))[0, -1].float()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99
    ta = full.generate_images("a red circle", temperature=0).tokens
    tb = quant.generate_images("a red circle", temperature=0).tokens
    assert (ta == tb).float().mean() > 0.5  # random weights: few logit margins, yet most greedy codes agree
