"""benchmark.py on tiny data: it runs, and what it prints holds together (the throughputs are the sizes over the
times it prints, the ratios are those of its numbers, the tiles are infer.py's). Speed itself is never asserted."""

import itertools
import re

import pytest

from research import benchmark
import predict
from metrics import ConfusionMatrix


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


@pytest.mark.slow
def test_loop_benchmark_times_the_page_and_its_table_holds_together(tmp_path, monkeypatch, capsys):
    import numpy as np

    from spec import PALETTE
    from tests.conftest import tiny_loop_scene
    label = tiny_loop_scene(tmp_path, monkeypatch)  # columns 0-1 clicked, column 2 scores
    out = tmp_path / "latency.md"
    args = benchmark.get_args_parser().parse_args(
        ["loop", "--preset", "synthetic", "--loop-rounds", "2", "--start-clicks", "3", "--round-clicks", "2", "--epochs",
         "2", "--adapt-steps", "3", "--threads", "1", "--out", str(out)])
    assert benchmark.main(args) == 0
    text = out.read_text()
    assert text.startswith("# The annotation page's loop, timed: preset `synthetic` (SYNTHETIC demo scene)")
    assert ("`python -m research.benchmark loop --preset synthetic --loop-rounds 2 --start-clicks 3 --round-clicks 2 "
            "--epochs 2 --adapt-steps 3 --annotation-seed 0 --threads 1 --out " + str(out) + "`") in text
    rows = [line.split(" | ") for line in text.splitlines() if re.match(r"\| \d+ \| (adapt|anew) \|", line)]
    assert [r[1] for r in rows] == ["anew", "adapt", "adapt", "anew"]
    clicks = [int(r[2]) for r in rows]
    assert clicks == [6 * 3, 6 * 3 + 2, 6 * 3 + 4, 6 * 3 + 4]  # 6 training patches; 2 more a round; none at the end
    assert [r[4].split()[0] for r in rows] == ["no", "yes", "yes", "yes"]  # train.py started ahead after round 0
    assert [r[7] for r in rows[1:3]] == ["3", "3"]  # the adapted rounds' optimizer steps
    assert rows[0][10] == "-" and all(r[10].isdigit() for r in rows[1:])  # changed pixels from the second model on
    assert all(r[9].endswith("(0)") for r in (rows[0], rows[-1]))  # a model trained anew has seen no held-out click
    latency = [float(r[3]) for r in rows]
    assert all(float(r[5]) + float(r[6]) <= float(r[3]) + 0.05 for r in rows)  # train + predict within the latency
    adapted = np.array(latency[1:3])
    summary = number(r"\| Train: adapted \(3 steps\) \| 2 \| ([\d.]+) \|", text)
    assert agrees(summary, 1, lambda a, b: float(np.median([a, b])), (adapted[0], 1), (adapted[1], 1))
    assert f"| {adapted.min():.1f} - {adapted.max():.1f} |" in text
    assert number(r"first model, trained anew \(2 epochs\) \| 1 \| ([\d.]+)", text) == float(rows[0][3])
    assert number(r"Retrain from scratch on the final clicks \(2 epochs\) \| 1 \| ([\d.]+)", text) == float(rows[3][3])
    # the all-background baseline: the training columns' commonest class over the val column
    cm = ConfusionMatrix(len(PALETTE))
    cm.update(np.full((60, 20), np.bincount(label[:, :40].ravel()).argmax()), label[:, 40:])
    assert number(r"\*\*all-background\*\* \(the training patches' commonest class everywhere\) scores ([\d.]+)",
                  text) == round(cm.compute()["miou"], 3)
    assert "wrote " + str(out) in capsys.readouterr().out


def test_a_loop_on_missing_data_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(benchmark.LOOP_PRESETS, "atlanta", dict(benchmark.LOOP_PRESETS["atlanta"],
                                                                images=str(tmp_path / "none")))
    assert benchmark.main(benchmark.get_args_parser().parse_args(["loop", "--out", str(tmp_path / "t.md")])) == 2
    assert capsys.readouterr().err.startswith(f"error: no folder {tmp_path / 'none'}: make realdata builds it")
