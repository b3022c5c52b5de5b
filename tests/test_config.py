"""The settings are declared once (config.py): everything else is derived from the declarations."""

import dataclasses
import typing

import pytest

import config
from research import experiments as E
from config import TrainConfig, add_arguments, check_config, config_from_args

# config keys computed before TrainConfig's settings were declared in config.py (data id 'd' * 16): the
# refactor keeps every finished experiment run valid
DEMO_KEYS = {
    "1000pts-uniform-wpoints-skip-g2-fixed": "87c22d83c3",
    "100pts-balanced-wpoints-skip-g2-fixed": "38d29f4f30",
    "100pts-uniform-aff1-cons1-wpoints-skip-g2-fixed": "cbc7de6088",
    "100pts-uniform-aff1-wpoints-skip-g2-fixed": "2b4b25b6c5",
    "100pts-uniform-cons1-wpoints-skip-g2-fixed": "16f797c0cb",
    "100pts-uniform-grown-wpoints-skip-g2-fixed": "770f78afcc",
    "100pts-uniform-st3t0.9-wpoints-skip-g2-fixed": "e3e5e24e01",
    "100pts-uniform-wpoints-skip-g2-fixed": "474315f5df",
    "100pts-uniform-wpoints-skip-g2-redrawn": "8b046c9c9c",
    "10pts-balanced-wpoints-skip-g2-fixed": "b11415249f",
    "10pts-uniform-3x10random-wpoints-skip-g2-fixed": "c6036253d9",
    "10pts-uniform-3x10uncertain-wpoints-skip-g2-fixed": "08f7cd7332",
    "10pts-uniform-aff1-cons1-wpoints-skip-g2-fixed": "197a7019f2",
    "10pts-uniform-aff1-wpoints-skip-g2-fixed": "86765244dd",
    "10pts-uniform-cons1-wpoints-skip-g2-fixed": "352f3b911a",
    "10pts-uniform-grown-wpoints-skip-g2-fixed": "5d731cd323",
    "10pts-uniform-st3t0.9-wpoints-skip-g2-fixed": "af4994ca7b",
    "10pts-uniform-wpoints-skip-g2-fixed": "53bad7d15f",
    "1perobject-3x10random-wpoints-skip-g2-fixed": "78908f11f6",
    "1perobject-3x10uncertain-wpoints-skip-g2-fixed": "0881a308ab",
    "1perobject-aff1-cons1-wpoints-skip-g2-fixed": "054da35e27",
    "1perobject-aff1-wpoints-skip-g2-fixed": "b301412977",
    "1perobject-cons1-wpoints-skip-g2-fixed": "a5b62b83cd",
    "1perobject-grown-wpoints-skip-g2-fixed": "1f2164a96c",
    "1perobject-st3t0.9-wpoints-skip-g2-fixed": "0e310a7988",
    "1perobject-wpoints-skip-g2-fixed": "518cfd4c54",
    "20000pts-uniform-wdense-skip-g2-fixed": "245a6ff707",
    "20000pts-uniform-wnone-plain-g2-fixed": "a1f0f006fb",
    "20000pts-uniform-wnone-skip-g2-fixed": "9ba8ead40d",
    "20000pts-uniform-wpoints-capped-skip-g2-fixed": "a73fcba48c",
    "20000pts-uniform-wpoints-effective-skip-g2-fixed": "16ebcc1676",
    "20000pts-uniform-wpoints-median-skip-g2-fixed": "a85249ed31",
    "20000pts-uniform-wpoints-plain-g2-fixed": "d950297697",
    "20000pts-uniform-wpoints-skip-g2-fixed": "81de8f94ae",
    "20000pts-uniform-wpoints-skip-g2-redrawn": "f2c4d9d323",
    "20000pts-uniform-wpoints-sqrt-skip-g2-fixed": "ad49aa76bc",
    "40pts-uniform-wpoints-skip-g2-fixed": "3b1f48828d",
    "5000pts-uniform-wpoints-skip-g2-fixed": "8d5242c3f0",
    "dense-wpoints-skip-g2-fixed": "4fda1f9b01",
}
ATLANTA_SUBSET_KEYS = {
    "1000pts-uniform-wpoints-skip-g2-fixed": "735b963c57",
    "100pts-balanced-wpoints-skip-g2-fixed": "3921ea944e",
    "100pts-uniform-aff1-cons1-wpoints-skip-g2-fixed": "f25e8d62b4",
    "100pts-uniform-aff1-wpoints-skip-g2-fixed": "379c075f50",
    "100pts-uniform-cons1-wpoints-skip-g2-fixed": "01064e5acc",
    "100pts-uniform-grown-wpoints-skip-g2-fixed": "c6d1c41734",
    "100pts-uniform-st3t0.9-wpoints-skip-g2-fixed": "aeaf2cfb89",
    "100pts-uniform-wpoints-skip-g2-fixed": "a51a5341b3",
    "100pts-uniform-wpoints-skip-g2-redrawn": "bf63b0b700",
    "10pts-balanced-wpoints-skip-g2-fixed": "72fe67c879",
    "10pts-uniform-3x10random-wpoints-skip-g2-fixed": "426b5356d4",
    "10pts-uniform-3x10uncertain-wpoints-skip-g2-fixed": "21d463fe80",
    "10pts-uniform-aff1-cons1-wpoints-skip-g2-fixed": "9846f2250b",
    "10pts-uniform-aff1-wpoints-skip-g2-fixed": "68a7b470b6",
    "10pts-uniform-cons1-wpoints-skip-g2-fixed": "79ce9a8e00",
    "10pts-uniform-grown-wpoints-skip-g2-fixed": "89cfd960d2",
    "10pts-uniform-st3t0.9-wpoints-skip-g2-fixed": "362b4fad9a",
    "10pts-uniform-wpoints-skip-g2-fixed": "bc09186478",
    "1perobject-3x10random-wpoints-skip-g2-fixed": "36e6f2fdbc",
    "1perobject-3x10uncertain-wpoints-skip-g2-fixed": "7d628f12a7",
    "1perobject-aff1-cons1-wpoints-skip-g2-fixed": "5210083283",
    "1perobject-aff1-wpoints-skip-g2-fixed": "4f64d65683",
    "1perobject-cons1-wpoints-skip-g2-fixed": "cf0db24184",
    "1perobject-grown-wpoints-skip-g2-fixed": "607af5ef67",
    "1perobject-st3t0.9-wpoints-skip-g2-fixed": "3968d3b58e",
    "1perobject-wpoints-skip-g2-fixed": "fa2b8a3aaf",
    "20000pts-uniform-wdense-skip-g2-fixed": "7da53a0054",
    "20000pts-uniform-wnone-plain-g2-fixed": "4ba3c1d611",
    "20000pts-uniform-wnone-skip-g2-fixed": "b9c68cba1e",
    "20000pts-uniform-wpoints-capped-skip-g2-fixed": "ef11de24f4",
    "20000pts-uniform-wpoints-effective-skip-g2-fixed": "712531dda1",
    "20000pts-uniform-wpoints-median-skip-g2-fixed": "a858cd6eff",
    "20000pts-uniform-wpoints-plain-g2-fixed": "722f6efae7",
    "20000pts-uniform-wpoints-skip-g2-fixed": "f220993030",
    "20000pts-uniform-wpoints-skip-g2-redrawn": "f8906202ae",
    "20000pts-uniform-wpoints-sqrt-skip-g2-fixed": "9aa619b117",
    "40pts-uniform-wpoints-skip-g2-fixed": "b532b43ddf",
    "5000pts-uniform-wpoints-skip-g2-fixed": "3285f721da",
    "dense-wpoints-skip-g2-fixed": "81062ebbc0",
}


@pytest.mark.parametrize("preset, ids, expected", [("demo", (None, None), DEMO_KEYS),
                                                    ("atlanta", (["0", "5"], ["9"]), ATLANTA_SUBSET_KEYS)])
def test_experiment_keys_of_finished_runs_still_match(preset, ids, expected):
    keys = E.Keys(E.PRESETS[preset], ids, "d" * 16)
    got = {run.name: keys.config_key(run) for e in E.EXPERIMENTS for _, run in e.rows
           if not isinstance(run, E.Reference)}  # the CNN rows; reference rows came later
    assert {name: got.get(name) for name in expected} == expected
    added = set(got) - set(expected)  # rows added since (relative pseudo-labels, the forest teacher): new keys
    assert added and not {got[name] for name in added} & set(expected.values())


def test_the_lists_are_read_off_the_declarations():
    assert set(config.NOT_IN_KEY) == {"out", "figures", "progress", "device", "workers", "resume", "overwrite",
                                      "loader", "export_clicks", "cache_dir", "select", "prior"}
    assert set(config.RESUMABLE) == set(config.NOT_IN_KEY) | {"epochs", "amp"}
    assert config.ANNOTATION_FIELDS == ("points", "strategy", "annotation_seed", "clicks", "class_field", "line_width",
                                        "val_clicks")
    assert config.NEUTRAL["affinity_weight"] == 0.0 and config.NEUTRAL["click_strategy"] == "uncertain"
    # neutral at the default, but for --sparse: on ("auto") by default, out of the key where experiments turn it off
    assert config.NEUTRAL["sparse"] == "off" != TrainConfig().sparse
    assert all(config.NEUTRAL[k] == getattr(TrainConfig(), k) for k in config.NEUTRAL if k != "sparse")
    assert "sparse" not in config.key_settings(TrainConfig(sparse="off"))
    assert config.key_settings(TrainConfig())["sparse"] == "auto"
    assert E.NOT_IN_KEY is config.NOT_IN_KEY and E.NEUTRAL is config.NEUTRAL


def test_the_command_line_is_derived_from_every_field():
    import argparse
    parser = add_arguments(argparse.ArgumentParser())
    flags = {a.dest: a for a in parser._actions if a.option_strings}
    for name, default, s in config.settings():
        if s.flag == "":
            assert name not in flags
            continue
        assert name in flags, name
        assert flags[name].help.startswith(s.help[:20].replace("%%", "%%")), name
    d = config_from_args(parser.parse_args([]))
    assert d == TrainConfig()  # no second default anywhere on the command line
    cfg = config_from_args(parser.parse_args(["--no-augment", "--region-growing", "--points", "1/object",
                                              "--exclude", "car,clutter", "--max-train", "3"]))
    assert (cfg.augment, cfg.region_growing, cfg.points, cfg.exclude, cfg.max_train) == \
        (False, True, "1/object", ("car", "clutter"), 3)


def test_every_check_names_the_flag_before_any_work():
    for change, match in ((dict(lr=0.0), "--lr must be a positive number"), (dict(gamma=-1), "--gamma must be >= 0"),
                          (dict(arch="vit"), "--arch must be one of resnet18, tiny"),
                          (dict(scale=32.0), r"--scale must be in \(0, 16\]"), (dict(workers=-1), "--workers"),
                          (dict(class_weights="nowhere.pt"), "--class-weights must be points, pixels, dense, none")):
        with pytest.raises(ValueError, match=match):
            check_config(TrainConfig(**change))


def test_a_new_setting_is_one_declaration(monkeypatch):
    """What adding a setting costs: one field. The parser, the check, the run key and the resume rule follow."""
    import argparse
    fields = [(f.name, f.type, f) for f in dataclasses.fields(TrainConfig)]
    fields.append(("grad_clip", int, config.setting(0, "gradient clipping norm", config.MODEL, check=config.whole(0),
                                                 must="be >= 0", neutral=True)))
    New = dataclasses.make_dataclass("TrainConfig", fields)
    monkeypatch.setattr(config, "TrainConfig", New)
    assert "grad_clip" in {n for n, _, _ in config.settings()}
    args = add_arguments(argparse.ArgumentParser()).parse_args(["--grad-clip", "5"])
    assert config_from_args(args).grad_clip == 5
    with pytest.raises(ValueError, match="--grad-clip must be >= 0"):
        check_config(New(grad_clip=-1))
    base = E.config_hash(New(), "d")  # neutral at its default: keys of finished runs do not move
    assert base == E.config_hash(TrainConfig(), "d") and E.config_hash(New(grad_clip=5), "d") != base


def test_one_rule_for_the_scale():
    from spec import DataSpec, check_scale
    for bad in (0, -1, 17, float("nan"), True):
        assert not check_scale(bad)
        with pytest.raises(ValueError):
            check_config(TrainConfig(scale=bad))
        with pytest.raises(ValueError):
            DataSpec(scale=bad)
    assert check_scale(16) and check_scale(0.25)


def ordinary(field, s):
    """One ordinary value of a field and the command-line tokens that say it, made from its annotation and choices
    (never from the default's type: a None default says nothing about the value)."""
    default = field.default
    if s.choices:
        v = next(c for c in s.choices if c != default)
        return v, [str(v)]
    kind = config.value_types(field)[0]
    if kind is bool:
        return not default, []
    if kind is int:
        v = 7 if default is None else default + 2  # odd stays odd (--affinity-kernel)
        return v, [str(v)]
    if kind is float:
        v = 0.5 if default is None else default / 2
        return v, [repr(v)]
    if kind is tuple:
        element = next(typing.get_args(a)[0] for a in (field.type, *typing.get_args(field.type))
                       if typing.get_origin(a) is tuple)  # tuple[int, ...] or Optional[tuple[int, ...]]
        v = (0, 2) if element is int else ("car", "tree")
        return v, [str(x) for x in v]
    return "some/where", ["some/where"]


def test_every_field_parses_from_the_command_line_to_its_python_value():
    """The `--scale 0.5` failure: a flag whose default is None was parsed as text. Every field with a flag, given one
    ordinary value on the command line, must equal the same value set in Python, type included."""
    import argparse
    parser = add_arguments(argparse.ArgumentParser())
    seen = 0
    for f in dataclasses.fields(TrainConfig):
        s = f.metadata["setting"]
        if s.flag == "":
            continue
        value, text = ordinary(f, s)
        name = s.flag or (f"--no-{f.name.replace('_', '-')}" if f.default is True else config.flag(f.name))
        parsed = getattr(config_from_args(parser.parse_args([name, *text])), f.name)
        assert parsed == value and type(parsed) is type(value), (name, text, parsed, value)
        if s.check is not None:
            assert s.check(parsed) == s.check(value), name
        seen += 1
    assert seen > 60
    cfg = config_from_args(parser.parse_args(["--scale", "0.5"]))
    check_config(cfg)  # the documented Atlanta flag passes its own check
    assert cfg.scale == 0.5


def test_every_setting_of_every_command_parses_to_its_python_value():
    """The same for the other commands' settings (infer, pretrain, annotate, assess, the benchmark): each field's
    ordinary value through the command's real parser (its required flags given too) equals the Python value."""
    import annotate
    import assess
    import infer
    import pretrain
    from research import benchmark
    parsers = command_parsers()
    for cls, command in ((infer.InferSettings, "infer.py"), (pretrain.PretrainConfig, "pretrain.py"),
                         (annotate.AnnotateSettings, "annotate.py"), (assess.SampleSettings, "assess.py sample"),
                         (assess.EstimateSettings, "assess.py estimate"), (benchmark.InferBench, "benchmark.py infer")):
        fields = [f for f in dataclasses.fields(cls) if f.metadata["setting"].flag != ""]
        needed = [w for f in fields if f.metadata.get("required") for w in (config.flag(f.name), "x/y")]
        for f in fields:
            s = f.metadata["setting"]
            value, text = ordinary(f, s)
            name = s.flag or (f"--no-{f.name.replace('_', '-')}" if f.default is True else config.flag(f.name))
            parsed = getattr(config.from_args(cls, parsers[command].parse_args(needed + [name, *text])), f.name)
            assert parsed == value and type(parsed) is type(value), (command, name, text, parsed, value)


def test_value_errors_name_their_flag_and_shares_have_one_form():
    import argparse
    parser = add_arguments(argparse.ArgumentParser())
    with pytest.raises(ValueError, match=r"^--max-train: a whole number \(or all\) expected, got 'x'"):
        config_from_args(parser.parse_args(["--max-train", "x"]))
    for text in ("20%", "0.2"):  # --val-fraction reads shares as --val-clicks does
        assert config_from_args(parser.parse_args(["--val-fraction", text])).val_fraction == pytest.approx(0.2)
        assert config_from_args(parser.parse_args(["--val-clicks", text])).val_clicks == pytest.approx(0.2)
    with pytest.raises(ValueError, match="^--val-fraction: a held-out share must be in"):
        config_from_args(parser.parse_args(["--val-fraction", "120%"]))
    for tokens in (["0,1,3"], ["0", "1", "3"], ["0,1", "3"]):  # --bands: commas or spaces, as in infer.py
        assert config_from_args(parser.parse_args(["--bands", *tokens])).bands == (0, 1, 3)
    with pytest.raises(ValueError, match="--bands takes band indices"):
        config_from_args(parser.parse_args(["--bands", "0,red"]))


def command_parsers():
    """{command: parser} of every command a user runs, subcommands apart."""
    import argparse

    import annotate
    import assess
    import infer
    import pretrain
    import train
    from research import benchmark
    out = {"train.py": train.get_args_parser(), "infer.py": infer.get_args_parser(),
           "pretrain.py": pretrain.get_args_parser(), "annotate.py": annotate.get_args_parser()}
    for name, parser in (("assess.py", assess.get_args_parser()), ("benchmark.py", benchmark.get_args_parser())):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        out.update({f"{name} {cmd}": p for cmd, p in sub.choices.items()})
    return out


def test_each_flag_is_declared_once_across_every_command():
    """One flag, one declaration: --scale, --size, --bands, --device, --batch-size (and every other flag that
    several commands take) have one help, one parser and one check wherever they appear; no parser adds a flag by
    hand (config.add_arguments is the only add_argument of a flag in the project's commands)."""
    import ast
    from pathlib import Path
    declared = {}
    for command, parser in command_parsers().items():
        for action in parser._actions:
            for option in action.option_strings:
                if option in ("-h", "--help"):
                    continue
                assert getattr(action, "setting", None) is not None, f"{command} {option}: added by hand"
                declared.setdefault(option, {}).setdefault(id(action.setting), set()).add(command)
    twice = {option: commands for option, commands in declared.items() if len(commands) > 1}
    assert not twice, f"flags declared more than once: {twice}"
    for option in ("--scale", "--size", "--bands", "--device", "--batch-size", "--images", "--out", "--classes"):
        (commands,) = declared[option].values()
        assert len(commands) >= 2, (option, commands)  # shared by several commands, declared once
    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("*.py"), root / "research" / "benchmark.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args and \
                    isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("-"):
                assert path.name == "config.py", f"{path.name}: add_argument({node.args[0].value!r}) by hand"
