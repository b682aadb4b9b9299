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
    # Greedy decisions along the full-precision model's own greedy image, each step given the same context
    # (teacher forcing: one early flip on random weights, whose logit margins are tiny, must not cascade).
    codes = full.generate_images("a red circle", temperature=0, cfg_weight=1.0).tokens[0]  # (n_codes,), no CFG
    seq = torch.cat([ids, torch.full((1, len(codes) - 1), full.processor.pad_id)], dim=1)
    gen = torch.cat([torch.full_like(ids, -1), codes[None, :-1]], dim=1)
    with torch.no_grad():
        steps = []
        for j in (full, quant):
            m = j.model
            steps.append(m.gen_head(m.decoder(m.embed(seq, gen_codes=gen)))[0, ids.shape[1] - 1:].float().argmax(-1))
    assert (steps[0] == codes).float().mean() > 0.9  # the one-pass forward reproduces the cached decode (bf16)
    assert (steps[1] == steps[0]).float().mean() > 0.8
