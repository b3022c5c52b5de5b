"""benchmark.py on tiny data: it runs, and what it prints holds together (the throughputs are the sizes over the
times it prints, the ratios are those of its numbers, the tiles are infer.py's). Speed itself is never asserted."""

import itertools
import re

import pytest

from research import benchmark
import predict


def number(pattern, text):
    """The float the first group of `pattern` captures in `text` (an AssertionError naming it if absent)."""
    m = re.search(pattern, text)
    assert m, f"no line matches {pattern!r} in:\n{text}"
    return float(m.group(1).replace(",", ""))


def agrees(shown, digits, f, *values):
    """`shown` (printed with `digits` decimals) is f(*values) for some values within the rounding of the printed
    ones: values are (number, its decimals) pairs."""
    corners = [f(*v) for v in itertools.product(*[(x - 0.5 * 10 ** -d, x + 0.5 * 10 ** -d) for x, d in values])]
    half = 0.5 * 10 ** -digits
    return min(corners) - half - 1e-9 <= shown <= max(corners) + half + 1e-9


@pytest.mark.slow
def test_infer_benchmark_reports_consistent_numbers(capsys):
    args = benchmark.get_args_parser().parse_args(
        ["infer", "--image-size", "256", "--files", "2", "--tile", "64", "--overlap", "8", "--batch-size", "4",
         "--threads", "1", "--device", "cpu", "--no-progress"])
    benchmark.main(args)
    out = capsys.readouterr().out

    h = w = 128  # 256 x the default scale 0.5
    ys, th = predict.tile_starts(h, 64, 8)
    xs, tw = predict.tile_starts(w, 64, 8)
    assert f"2 x 256x256 input (strip TIFF, read whole), scale 0.5 -> model input {w}x{h}" in out
    assert f"{len(ys) * len(xs)} tiles of {tw}x{th} (overlap >= 8), batch 4, TTA none" in out
    megapixels = 2 * 256 * 256 / 1e6
    seconds = {}
    for mode in ("pipelined", "serial"):
        s = number(rf"{mode} end to end\s*:\s*([\d.]+) s", out)
        rate = number(rf"{mode} end to end\s*:\s*[\d.]+ s\s+([\d.]+) MP/s", out)
        assert s > 0 and agrees(rate, 3, lambda t: megapixels / t, (s, 2))
        peak = number(rf"{mode} end to end.*peak RSS (\d+) MB", out)
        after_imports = number(rf"{mode} end to end.*\((\d+) MB after imports", out)
        assert 0 < after_imports <= peak
        seconds[mode] = s
    assert "masks byte-identical: yes" in out  # pipelined and serial wrote the same files
    speedup = number(r"pipelined vs serial\s*:\s*([\d.]+)x", out)
    assert agrees(speedup, 2, lambda se, pi: se / pi, (seconds["serial"], 2), (seconds["pipelined"], 2))
    alone = number(r"model alone\s*:\s*([\d.]+) s", out)
    assert f"batches of {min(4, len(ys) * len(xs))}x3x{th}x{tw})" in out
    for mode in ("pipelined", "serial"):
        ratio = number(rf"ratio, {mode}\s*:\s*([\d.]+)", out)
        assert agrees(ratio, 2, lambda al, e2e: al / e2e, (alone, 2), (seconds[mode], 2))


@pytest.mark.slow
def test_train_benchmark_reports_consistent_numbers(capsys):
    args = benchmark.get_args_parser().parse_args(
        ["train", "--patches", "8", "--size", "32", "--epochs", "1", "--batch-size", "4", "--points", "100",
         "--workers", "0", "--threads", "1", "--device", "cpu"])
    benchmark.main(args)
    out = capsys.readouterr().out

    assert "7 train + 1 val synthetic 300x300 patches at 32x32, 100 points, batch 4, skip decoder, 1 epochs" in out
    a = number(r"\(a\) published-style per-item DataLoader \(0 workers\):\s*([\d.]+) images/s", out)
    b = number(r"\(b\) train\.train\(\) end to end, val every epoch\s*:\s*([\d.]+) images/s", out)
    c = number(r"\(c\) the model alone on resident tensors\s*:\s*([\d.]+) images/s", out)
    assert min(a, b, c) > 0
    setup = number(r"\+([\d.]+) s set-up and checkpoints", out)
    wall = number(r"set-up and checkpoints \(([\d.]+) s in all\)", out)
    assert 0 <= setup <= wall
    assert re.search(r"^    data path: resident batches on cpu", out, re.M)  # (b) took train.py's default path
    assert agrees(number(r"b/c ([\d.]+)", out), 2, lambda x, y: x / y, (b, 1), (c, 1))
    assert agrees(number(r"b/a ([\d.]+)", out), 2, lambda x, y: x / y, (b, 1), (a, 1))
    for name, rate in (("a", a), ("b", b), ("c", c)):  # 100 epochs of 2,100 + 300 patches at that rate
        minutes = number(rf"\({name}\) ([\d,]+) min", out)
        assert agrees(minutes, 0, lambda r: 100 * 2400 / r / 60, (rate, 1))


def test_a_train_benchmark_sized_in_steps_or_windows_is_refused_with_a_message(capsys):
    for extra in (["--crop", "32"], ["--steps", "10", "--schedule", "cosine"]):
        args = benchmark.get_args_parser().parse_args(["train", "--patches", "4", *extra])
        assert benchmark.main(args) == 2
        assert capsys.readouterr().err.startswith("error: benchmark.py train counts images of whole-image epochs")
