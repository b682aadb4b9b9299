"""The januskit command: outputs, and one-line errors with a non-zero exit for user mistakes."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

from januskit.cli import main

from conftest import OFFICIAL_TINY


def run(*args):
    return subprocess.run([sys.executable, "-m", "januskit.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_writes_pngs(tmp_path, capsys):
    rc = main(["generate", "a red circle", "--model", str(OFFICIAL_TINY), "-n", "2", "--seed", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 2
    for p in paths:
        assert Image.open(p).size == (384, 384)


def test_chat_prints_answer(capsys):
    rc = main(["chat", "--model", str(OFFICIAL_TINY), "--image", str(OFFICIAL_TINY / "image_0.png"),
               "--max-new-tokens", "4", "What is in the image?"])
    assert rc == 0
    assert capsys.readouterr().out.strip() != ""


def test_info_prints_parameter_counts(capsys):
    assert main(["info", str(OFFICIAL_TINY)]) == 0
    out = capsys.readouterr().out
    assert "language_model" in out and "total" in out


def test_user_errors_have_no_traceback(tmp_path):
    cases = [
        ["generate", "x", "--model", str(tmp_path / "missing")],
        ["generate", "x", "--model", str(OFFICIAL_TINY), "-n", "0"],
        ["chat", "--model", str(OFFICIAL_TINY), "--image", str(tmp_path / "none.png"), "hi"],
        ["info", "nonexistent-dir"],
    ]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    cases.append(["chat", "--model", str(OFFICIAL_TINY), "--image", str(bad), "hi"])
    for args in cases:
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and "error:" in r.stderr, (args, r.stderr)


def test_convert_both_ways(tmp_path):
    r = run("convert", str(OFFICIAL_TINY), str(tmp_path / "hf"), "--to", "hf")
    assert r.returncode == 0, r.stderr
    assert '"model_type": "janus"' in (tmp_path / "hf" / "config.json").read_text()
    r = run("convert", str(tmp_path / "hf"), str(tmp_path / "official"), "--to", "official")
    assert r.returncode == 0, r.stderr
    assert '"model_type": "multi_modality"' in (tmp_path / "official" / "config.json").read_text()


def test_interactive_chat_loop():
    r = subprocess.run([sys.executable, "-m", "januskit.cli", "chat", "--model", str(OFFICIAL_TINY),
                        "--max-new-tokens", "3"], input="Hello there\nAnd again?\nexit\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("janus> ") == 2


EXAMPLE = Path(__file__).resolve().parents[1] / "januskit" / "assets" / "examples" / "three_shapes.png"


def test_chat_prints_the_bare_answer(capsys):
    # The bundled model's reply decodes as " 3" (the tokenizer's leading space, kept in the API as the official
    # decode keeps it); the terminal gets the answer alone, one-shot and interactive.
    assert main(["chat", "--image", str(EXAMPLE), "How many shapes are there?"]) == 0
    assert capsys.readouterr().out == "3\n"
    r = subprocess.run([sys.executable, "-m", "januskit.cli", "chat", "--image", str(EXAMPLE)],
                       input="How many shapes are there?\nexit\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "janus> 3\n" in r.stdout, r.stdout
