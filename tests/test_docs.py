"""README.md and docs/: the results blocks are what research/make_readme_results.py writes from results/, the house
names every top-level module on its floor, links resolve, and the text names no removed command."""

import re
from pathlib import Path

import pytest

from research import make_readme_results as R

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def read(path):
    return path.read_text()


# --------------------------------------------------------------------------- the results blocks

def test_results_blocks_are_what_the_script_generates():
    """Fails when a number in a block was edited by hand or results/ changed without `make readme-results`."""
    stale = [str(p.relative_to(ROOT)) for p in DOCS if R.render(read(p), p.relative_to(ROOT)) != read(p)]
    assert not stale, f"results blocks out of date in {stale}: run `make readme-results`"
    assert R.main(R.get_args_parser().parse_args(["--check"])) == 0


def test_readme_shows_synthetic_and_real_results_each_labelled():
    text = read(ROOT / "README.md")
    blocks = R.BLOCK.findall(text)
    assert {"synthetic", "atlanta"} <= {b[1] for b in blocks}
    for _, source, _, body, _ in blocks:
        first = body.splitlines()[0]
        assert first.startswith(R.SOURCES[source][1]) and ("**SYNTHETIC" in first) != ("**REAL" in first)
        assert "baseline" in body  # the all-background baseline, or a line saying the report has none


def test_a_report_without_sections_shows_its_title_and_first_table(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "annotate_latency_atlanta.md").write_text(
        "# The loop, timed\n\nWritten by x.\n\n| training | median (s) |\n|---|---:|\n| adapted | 17.4 |\n\n"
        "| round | latency |\n|---:|---:|\n| 0 | 29.0 |\n\nVal mIoU; **all-background** scores 0.485 there.\n")
    monkeypatch.setattr(R, "ROOT", tmp_path)
    text = R.block("latency_atlanta", ["summary"], Path("docs/annotate.md"))
    assert text.startswith("**REAL data**") and "**The loop, timed**" in text
    assert "| adapted | 17.4 |" in text and "| 0 | 29.0 |" not in text  # the first table only
    assert "**all-background** scores 0.485" in text


def test_a_hand_edited_number_is_found_and_put_back(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "experiments.md").write_text(
        "# Experiments\n\n## 7. Class weighting\n\n| run | mIoU % |\n|---|---:|\n| sqrt | 66.4 ± 1.0 |\n"
        "| all background (majority class) | 12.3 |\n\n![fig](fig.png)\n\n## Closing note\n\n- a note.\n\n"
        "## 10. Per class\n\n| run | a | b |\n|---|---:|---:|\n| all background (majority class) | 1.0 | 0.0 |\n")
    monkeypatch.setattr(R, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "x.md"
    fresh = "intro\n<!-- results:synthetic 7 closing -->\n<!-- /results -->\noutro\n"
    doc.write_text(fresh)
    assert R.main(R.get_args_parser().parse_args(["--check"])) == 1  # an empty block is stale
    assert R.main(R.get_args_parser().parse_args([])) == 0
    text = doc.read_text()
    assert text.startswith("intro\n<!-- results:synthetic 7 closing -->\n**SYNTHETIC") and text.endswith("outro\n")
    assert "| sqrt | 66.4 ± 1.0 |" in text and "- a note." in text and "fig.png" not in text
    assert "](../results/experiments.md)" in text  # linked relative to the file that shows it
    assert text.count("| all background (majority class) | 12.3 |") == 1  # the baseline row, once
    assert "| 1.0 | 0.0 |" not in text  # not a per-class row under the other table's header
    assert "reports no all-background" not in text
    assert R.main(R.get_args_parser().parse_args(["--check"])) == 0
    doc.write_text(text.replace("66.4 ± 1.0", "67.0 ± 1.0"))  # a number typed in by hand
    assert R.main(R.get_args_parser().parse_args(["--check"])) == 1
    assert R.render(doc.read_text(), Path("docs/x.md")) == text


def test_a_report_without_a_baseline_says_so_and_a_missing_section_is_named(tmp_path, monkeypatch):
    (tmp_path / "results" / "atlanta").mkdir(parents=True)
    (tmp_path / "results" / "atlanta" / "experiments.md").write_text("# E\n\n## Closing note\n\n- x.\n")
    monkeypatch.setattr(R, "ROOT", tmp_path)
    text = R.block("atlanta", ["closing"], Path("README.md"))
    assert text.startswith("**REAL data**") and "reports no all-background (majority) baseline" in text
    with pytest.raises(KeyError, match="results/atlanta/experiments.md has no section '7'"):
        R.block("atlanta", ["7"], Path("README.md"))
    with pytest.raises(KeyError, match="unknown results source 'potsdam'"):
        R.block("potsdam", ["7"], Path("README.md"))


# --------------------------------------------------------------------------- the text

def test_readme_opens_with_the_two_commands_and_stays_short():
    text = read(ROOT / "README.md")
    assert len(text.splitlines()) <= 200
    first_code = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_code[0].startswith("make demo ") and first_code[1].startswith("make test ")
    makefile = read(ROOT / "Makefile")
    assert re.search(r"^demo: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)
    assert "make test" in read(ROOT / ".ci" / "run")


def house():
    """{floor: module names} of the README's house, {folder: names} of research/ and tools/, and the names of the
    `you run` line."""
    block = read(ROOT / "README.md").split("## The house", 1)[1].split("```", 2)[1]
    floors, folders, run = {}, {}, set()
    for line in block.splitlines():
        words = line.split()
        if line.startswith("you run"):
            run = {w.split(".")[0] for w in words if w.endswith((".py", ".ipynb"))}
        elif words and words[0] in ("research/", "tools/", "page/"):
            folders[words[0].rstrip("/")] = set(re.findall(r"\b(\w+)\b", line.split("(")[0])) - {words[0].rstrip("/")}
        elif re.match(r"^(core)?\s+\d\s", line):
            number, rest = re.match(r"^(?:core)?\s+(\d)\s+(.*?)(?:\s{3,}[a-z].*)?$", line).groups()
            floors[int(number)] = set(re.findall(r"\b([a-z_]+)\b", re.sub(r"\([^)]*\)", "", rest)))
    return floors, folders, run


def project_imports(path, names):
    import ast
    tree = ast.parse(path.read_text())
    found = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    found |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return (found & names) - {path.stem}


def test_the_house_names_every_module_and_its_imports_point_down():
    """The README's house: every top-level module on one floor and only those; page/, research/ and tools/ as they
    are; and every module imports only modules on lower floors (config.py near the ground), page/ only below
    annotate.py, which alone imports it."""
    floors, folders, run = house()
    named = set().union(*floors.values())
    present = {p.stem for p in ROOT.glob("*.py")}
    assert named == present, f"not in the house: {sorted(present - named)}, not in the repo: {sorted(named - present)}"
    assert sum(len(f) for f in floors.values()) == len(named)  # each on one floor
    floor_of = {m: k for k, ms in floors.items() for m in ms}
    for m in present:
        for dep in project_imports(ROOT / f"{m}.py", present):
            assert floor_of[dep] < floor_of[m], f"{m}.py (floor {floor_of[m]}) imports {dep} (floor {floor_of[dep]})"
    assert floor_of["config"] <= 3 and floor_of["spec"] <= 2
    for folder, names in folders.items():
        assert names == {p.stem for p in (ROOT / folder).glob("*.py")} - {"__init__"}, folder
    assert run <= present | {"train"} and (ROOT / "train.ipynb").is_file()
    # page/: annotate.py's parts, between annotate and the core modules it uses; research/ and tools/ use them all
    for p in (ROOT / "page").glob("*.py"):
        for dep in project_imports(p, present):
            assert floor_of[dep] < floor_of["annotate"], f"page/{p.name} imports {dep} (floor {floor_of[dep]})"
    users = {m for m in present if "page" in project_imports(ROOT / f"{m}.py", present | {"page"})}
    assert users == {"annotate"}, f"only annotate.py imports page/, not {sorted(users - {'annotate'})}"


REMOVED_CLIS = ("dataset", "class_weights", "resident", "few_clicks", "model", "partial_ce_loss", "spec", "raster",
                "weak_losses")
DEVELOPMENT_LOG = (r"\b(this|first|last|previous|next) round\b|this round's|after this round|issue \d+ added|"
                   r"\bnow (loses|wins|beats|turns|ties|helps)\b|\ban earlier (rule|default|version)\b|"
                   r"\bno longer (enter|counts?|used|helps?)\b|\bused to (be|train|write)\b|\bwas changed\b|"
                   r"\b(the|this) issue (asks|asked|wants|wanted|says|said)\b")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_say_what_is_true_now_and_name_no_removed_command(path):
    text = read(path)
    assert not re.search(DEVELOPMENT_LOG, text, re.I), re.search(DEVELOPMENT_LOG, text, re.I).group(0)
    for name in REMOVED_CLIS:
        assert f"python {name}.py" not in text, f"{path.name} tells users to run python {name}.py"
    assert "--class-weighting inverse` (default" not in text


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", read(path)):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


# --------------------------------------------------------------------------- the commands they show

SCRIPTS = ("train.py", "infer.py", "pretrain.py", "annotate.py", "assess.py")
COMMAND = re.compile(r"(?:python3?\b|\$\(PY\)|torchrun\b)[^`\n]*?\b(?:" + "|".join(map(re.escape, SCRIPTS))
                     + r")\b[^`\n]*")


def documented_commands(paths):
    """(where, script, argv) of every `python train.py|infer.py|pretrain.py|annotate.py ...` (or torchrun, or the
    Makefile's $(PY)) in `paths`, in code blocks and inline code alike: lines joined at a trailing backslash; a
    literal `...` (options left out) and a comment are dropped; a template ({python} train.py {images}) is not a
    command."""
    import shlex
    out = []
    for path in paths:
        for m in COMMAND.finditer(re.sub(r"\\\n\s*", " ", read(path))):
            if "{" in m.group(0):
                continue
            words = [w for w in shlex.split(m.group(0), comments=True) if w != "..."]
            script = next(w for w in words if w in SCRIPTS)
            out.append((f"{path.name}: {m.group(0).strip()}", script, words[words.index(script) + 1:]))
    return out


def refused(commands):
    """What each command's script says against it: its parser, and for train.py the checks and rules of the
    settings (files they name need not exist here), for infer.py its argument checks. [] when all pass."""
    import annotate
    import assess
    import config
    import infer
    import pretrain
    import train
    modules = {"train.py": train, "infer.py": infer, "pretrain.py": pretrain, "annotate.py": annotate,
               "assess.py": assess}
    problems = []
    for where, script, argv in commands:
        if argv in (["--help"], ["-h"]):
            continue
        try:
            args = modules[script].get_args_parser().parse_args(argv)
            if script == "train.py":
                cfg = config.config_from_args(args)
                for name, _, s in config.settings():
                    v = getattr(cfg, name)
                    if name not in ("class_weights", "encoder") and not (  # those two check that a file exists
                            (s.choices is None or v in s.choices) and (s.check is None or s.check(v))):
                        raise ValueError(f"{config.flag(name)} {v!r}")
                for rule in config.RULES:
                    for problem in rule(cfg):
                        raise ValueError(problem)
            elif script in ("infer.py", "assess.py"):
                modules[script].check_args(args)
        except SystemExit:
            problems.append(f"{where}: refused by {script}'s parser")
        except ValueError as e:
            problems.append(f"{where}: {e}")
    return problems


def test_every_documented_command_parses_with_the_real_parser(tmp_path, monkeypatch):
    """A documented command can never be refused (the `--scale 1` commands of docs/data.md were)."""
    commands = documented_commands([*DOCS, ROOT / "Makefile"])
    assert {s for _, s, _ in commands} == set(SCRIPTS) and len(commands) > 30
    monkeypatch.chdir(tmp_path)  # --export-clicks must not find a file of this checkout
    assert refused(commands) == []


def test_a_refused_documented_command_is_found(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    doc = tmp_path / "x.md"
    doc.write_text("```bash\npython train.py --images a --clicks c.csv \\\n   --scale 1 --steps auto  # sized\n```\n"
                   "and `python infer.py --input in/ ... --tile 8` inline, "
                   "`python pretrain.py --images a --out e.pth`\n")
    commands = documented_commands([doc])
    assert [(s, a) for _, s, a in commands] == [
        ("train.py", ["--images", "a", "--clicks", "c.csv", "--scale", "1", "--steps", "auto"]),
        ("infer.py", ["--input", "in/", "--tile", "8"]), ("pretrain.py", ["--images", "a", "--out", "e.pth"])]
    problems = refused(commands)
    assert len(problems) == 2
    assert "--steps sizes training in optimizer steps" in problems[0] and "--tile must be >= 32" in problems[1]
