"""Fill the marked results blocks of README.md and docs/*.md from the generated reports (results/**/*.md).

    python -m research.make_readme_results            # rewrite every block from results/experiments.md, results/atlanta/...
    python -m research.make_readme_results --check    # exit 1 and name the files whose blocks differ (tests, CI)

A block is two HTML comments, which Markdown does not show; everything between them is this script's:

    <!-- results:synthetic 7 closing -->
    ...generated...
    <!-- /results -->

The first word names the report (SOURCES: `synthetic`, `atlanta`, `atlanta_steps`, `synthetic_steps`, `suggest_*`,
`latency_*`, `live_*`); the words after it name its sections, in order: a number (`7` = "## 7. ..."), `closing`
(the closing note), `goals` (few clicks against the goals), `rules` or `paired` (the suggestion rules' table and
their differences from random), or `summary` (the title and first table of a report without sections: the loop's
latency, the live layer). Every block starts with a line saying which data the numbers come from (SYNTHETIC or
REAL) and ends with the report's all-background (majority) baseline, or says that the report has none. Numbers are
never typed into the docs by hand: rerun what wrote the report (its command is in the block), then this script.
"""

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root
DOCS = ("README.md", "docs")  # files and folders whose .md files may hold blocks

SOURCES = {  # name -> (report, what its numbers are, the command that writes it)
    "synthetic": ("results/experiments.md", "**SYNTHETIC demo data** (procedural scenes from `tools/demo_data.py`; "
                  "says nothing about ISPRS Potsdam)", "python -m research.experiments --preset demo --report"),
    "atlanta": ("results/atlanta/experiments.md", "**REAL data** (SpaceNet Atlanta buildings, `make realdata`; "
                "2 classes)", "python -m research.experiments --preset atlanta --report"),
    "atlanta_steps": ("results/atlanta-steps/experiments.md", "**REAL data** (SpaceNet Atlanta buildings, `make "
                      "realdata`; 2 classes; sized in optimizer steps, `--steps auto`)",
                      "python -m research.experiments --preset atlanta-steps --report"),
    "synthetic_steps": ("results/demo-steps/experiments.md", "**SYNTHETIC demo data** (procedural scenes from "
                        "`tools/demo_data.py`; says nothing about ISPRS Potsdam; sized in optimizer steps, `--steps auto`)",
                        "python -m research.experiments --preset demo-steps --report"),
    "suggest_demo": ("results/annotate_suggest_demo.md", "**SYNTHETIC demo data** (procedural scenes from "
                     "`tools/demo_data.py`; the annotation page's loop driven by a simulated person)",
                     "python -m research.annotate_loop --preset demo --seeds 3 --start 5 --clicks 5 --rounds 3 --epochs 8"),
    "latency_atlanta": ("results/annotate_latency_atlanta.md", "**REAL data** (SpaceNet Atlanta, `make realdata`; "
                        "the annotation page's loop timed on 2 CPU cores)",
                        "python -m research.benchmark loop --preset atlanta"),
    "latency_synthetic": ("results/annotate_latency_synthetic.md", "**SYNTHETIC demo scene** (`tools/demo_data.py`; "
                          "the annotation page's loop timed on 2 CPU cores)",
                          "python -m research.benchmark loop --preset synthetic"),
    "live_atlanta": ("results/click_response_atlanta.md", "**REAL data** (SpaceNet Atlanta, `make realdata`; the "
                     "live layer, one seed)", "python -m research.click_response --preset atlanta"),
    "live_synthetic": ("results/click_response_synthetic.md", "**SYNTHETIC demo scene** (`tools/demo_data.py`; the "
                       "live layer, one seed)", "python -m research.click_response --preset synthetic"),
    "suggest_atlanta": ("results/annotate_suggest_atlanta.md", "**REAL data** (SpaceNet Atlanta buildings, `make "
                        "realdata`; 2 classes; the annotation page's loop driven by a simulated person)",
                        "python -m research.annotate_loop --preset atlanta --seeds 3 --start 5 --clicks 5 --rounds 2 "
                        "--epochs 20"),
}
NAMED = {"closing": "Closing note", "goals": "Few clicks against the goals", "rules": "Val mIoU % by clicks",
         "paired": "Minus random, paired by seed"}
BLOCK = re.compile(r"(<!-- results:(\w+)((?: [\w-]+)*) -->\n)(.*?)(<!-- /results -->)", re.S)
BASELINE = re.compile(r"\ball[- ]background\b|\bmajority\b", re.I)

# --------------------------------------------------------------------------- reading a report


def sections(text):
    """{heading: body} of a report's '## ' sections, in order."""
    out, head = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            head = line[3:].strip()
            out[head] = []
        elif head is not None:
            out[head].append(line)
    return {h: "\n".join(body).strip() for h, body in out.items()}


def first_table(text):
    """The report's title and its first table (the summary of a report without '## ' sections)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return None
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[0].lstrip("# ").strip(), "\n".join(lines[start:end])


def find_section(secs, part, report, text=""):
    """The (heading, body) that `part` names (`summary`: the title and first table of `text`); a KeyError that
    names the report when there is none."""
    if part == "summary" and first_table(text):
        return first_table(text)
    for head, body in secs.items():
        if (part.isdigit() and head.startswith(f"{part}. ")) or (part in NAMED and head.startswith(NAMED[part])):
            return head, body
    raise KeyError(f"{report} has no section '{part}' (headings: {', '.join(secs)}); rerun the report or fix the "
                   f"block's marker")


def baseline_lines(text):
    """The report's lines about the all-background (majority) baseline, each once: sentences as they are, table
    rows under the header (and its separator) of the first table that holds them; rows of tables with other
    columns (the per-class IoU tables) are left out, as they would not fit under that header."""
    lines, out, header = text.splitlines(), [], None
    for i, line in enumerate(lines):
        if not BASELINE.search(line) or line in out:
            continue
        if line.startswith("|"):
            if header is None:
                top = i
                while top > 0 and lines[top - 1].startswith("|"):
                    top -= 1
                header = lines[top:top + 2]
                out += header
            elif line.count("|") != header[0].count("|"):
                continue
        out.append(line)
    return out


# --------------------------------------------------------------------------- writing a block

def block(source, parts, target):
    """The generated text between the markers of one block in file `target`."""
    if source not in SOURCES:
        raise KeyError(f"{target}: unknown results source '{source}' (one of: {', '.join(SOURCES)})")
    report, what, command = SOURCES[source]
    text = (ROOT / report).read_text()
    link = os.path.relpath(ROOT / report, (ROOT / target).parent)
    lines = [f"{what}: from [`{report}`]({link}), written by `{command}`.", ""]
    shown = []
    for part in parts:
        head, body = find_section(sections(text), part, report, text)
        body = re.sub(r"!\[[^\]]*\]\([^)]*\)\n?", "", body).strip()  # figures: linked from the report itself
        lines += [f"**{head}**", "", body, ""]
        shown.append(body)
    base = [b for b in baseline_lines(text) if not any(b in s for s in shown)]
    if base:
        lines += ["All-background (majority) baseline:", ""] + base + [""]
    elif not any(baseline_lines(s) for s in shown):
        lines += [f"`{report}` reports no all-background (majority) baseline.", ""]
    return "\n".join(lines)


def render(text, target):
    """`text` (the file `target`, relative to the repo root) with every block regenerated."""
    def fill(m):
        return m.group(1) + block(m.group(2), m.group(3).split(), target) + "\n" + m.group(5)
    return BLOCK.sub(fill, text)


def targets():
    """The Markdown files that may hold blocks, relative to the repo root."""
    out = []
    for name in DOCS:
        p = ROOT / name
        out += sorted(p.glob("*.md")) if p.is_dir() else [p] if p.is_file() else []
    return [p.relative_to(ROOT) for p in out]


# --------------------------------------------------------------------------- CLI

def get_args_parser():
    p = argparse.ArgumentParser(description="Fill the results blocks of README.md and docs/*.md from results/.")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs from results/")
    return p


def main(args):
    stale = []
    for rel in targets():
        path = ROOT / rel
        old = path.read_text()
        new = render(old, rel)
        if new != old:
            stale.append(str(rel))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"results blocks out of date in: {', '.join(stale)}; run `python -m research.make_readme_results`",
              file=sys.stderr)
        return 1
    print(("rewrote: " + ", ".join(stale)) if stale and not args.check else "results blocks up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
