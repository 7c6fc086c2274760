"""Tests for vermeil/config.py: the strict dict -> dataclass converter, YAML loading, overrides, presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from vermeil.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    load_yaml,
    merge_preset,
    pick_preset,
    save_yaml,
    to_dict,
)

pytest.importorskip("yaml")


@dataclass
class MoE:
    n_experts: int = 4
    top_k: int = 1


@dataclass
class Model:
    dim: int = 64
    n_heads: int = 4
    norm: Literal["rms", "layer"] = "rms"
    dropout: float = 0.0
    n_kv_heads: int | None = None
    moe: MoE | None = None
    attn_layers: list[int] = field(default_factory=list)
    window: tuple[int, int] = (0, 0)
    tags: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")


@dataclass
class Train:
    lr: float = 3e-4
    steps: int = 10
    compile: bool = False
    name: str = "run"


@dataclass
class Config:
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)


@dataclass
class Required:
    dim: int


def test_unknown_key_did_you_mean() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(Model, {"n_head": 8})
    msg = str(e.value)
    assert "unknown config key 'n_head'" in msg
    assert "did you mean 'n_heads'?" in msg
    assert "allowed: ['dim', 'n_heads'," in msg


def test_nested_unknown_key_names_dotted_path() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown config key 'topk' in model\.moe \(did you mean 'top_k'\?\)"
    ):
        from_dict(Config, {"model": {"moe": {"topk": 2}}})


def test_several_unknown_keys_all_named() -> None:
    with pytest.raises(ConfigError, match=r"'n_head' \(did you mean 'n_heads'\?\), 'dimm'"):
        from_dict(Model, {"n_head": 8, "dimm": 3})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"dim": "big"}, r"model\.dim='big' must be int, got str"),
        ({"dim": "512"}, r"model\.dim='512' must be int, got str \(a quoted number"),
        ({"dim": 512.5}, r"model\.dim=512\.5 must be int, got float"),
        ({"dim": True}, r"model\.dim=True must be int, got bool"),
        ({"dropout": "0.1"}, r"model\.dropout='0\.1' must be float, got str"),
        ({"attn_layers": [0, "x"]}, r"model\.attn_layers\[1\]='x' must be int"),
        ({"attn_layers": "0,1"}, r"model\.attn_layers='0,1' must be a list"),
        ({"tags": {"a": "b"}}, r"model\.tags\.a='b' must be float"),
        ({"moe": {"top_k": "2"}}, r"model\.moe\.top_k='2' must be int"),
        ({"n_kv_heads": 2.0}, r"model\.n_kv_heads=2\.0 must be int"),
    ],
)
def test_wrong_types_name_dotted_key_value_and_rule(data: dict, pattern: str) -> None:
    with pytest.raises(TypeError, match=pattern):
        from_dict(Config, {"model": data})


def test_literal_rejects_yaml11_bool(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  norm: no\n")
    data = load_yaml(path)
    assert data["model"]["norm"] is False  # YAML 1.1 semantics are kept; the converter catches it
    with pytest.raises(ConfigError, match=r"model\.norm=False must be one of \['rms', 'layer'\].*quote"):
        from_dict(Config, data)
    with pytest.raises(ConfigError, match=r"model\.norm='batch' must be one of"):
        from_dict(Config, {"model": {"norm": "batch"}})


def test_yaml12_floats(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\nmodel:\n  dropout: 1\n  tags: {a: 2.5E+2, b: -3e0}\n")
    cfg = from_dict(Config, load_yaml(path))
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.model.dropout == 1.0 and isinstance(cfg.model.dropout, float)  # int accepted for float
    assert cfg.model.tags == {"a": 250.0, "b": -3.0}
    import yaml

    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"  # the trap the loader avoids; SafeLoader is unchanged


def test_optional_lists_tuples_nested() -> None:
    cfg = from_dict(
        Config,
        {"model": {"n_kv_heads": None, "moe": {"n_experts": 8}, "attn_layers": [1, 3], "window": [2, 5]}},
    )
    assert cfg.model.n_kv_heads is None
    assert cfg.model.moe == MoE(n_experts=8, top_k=1)
    assert cfg.model.attn_layers == [1, 3]
    assert cfg.model.window == (2, 5)
    assert from_dict(Model, {"n_kv_heads": 2}).n_kv_heads == 2
    with pytest.raises(ConfigError, match=r"model\.window=\[1, 2, 3\] must have 2 items"):
        from_dict(Config, {"model": {"window": [1, 2, 3]}})
    with pytest.raises(TypeError, match=r"model\.moe must be a mapping"):
        from_dict(Config, {"model": {"moe": 3}})


def test_post_init_errors_are_prefixed_and_required_keys() -> None:
    with pytest.raises(ConfigError, match=r"^model: dim=50 must be divisible by n_heads=4$"):
        from_dict(Config, {"model": {"dim": 50}})
    with pytest.raises(ConfigError, match=r"missing required config key 'dim'"):
        from_dict(Required, {})
    with pytest.raises(TypeError, match=r"must be a mapping"):
        from_dict(Config, [1, 2])


def test_overrides_dotted_unknown_and_malformed() -> None:
    base = {"model": {"dim": 64}, "train": {"lr": 0.1}}
    out = apply_overrides(
        base, ["train.lr=1e-3", "model.n_heads=8", "model.attn_layers=[0, 2]", "train.name=a=b"]
    )
    assert base == {"model": {"dim": 64}, "train": {"lr": 0.1}}  # input untouched
    cfg = from_dict(Config, out)
    assert cfg.train.lr == 0.001 and cfg.model.n_heads == 8 and cfg.model.attn_layers == [0, 2]
    assert cfg.train.name == "a=b"
    assert from_dict(Config, apply_overrides({}, ["model.moe.top_k=2"])).model.moe == MoE(top_k=2)

    with pytest.raises(
        ConfigError, match=r"unknown config key 'n_head' in model \(did you mean 'n_heads'\?\)"
    ):
        from_dict(Config, apply_overrides(base, ["model.n_head=8"]))
    with pytest.raises(ConfigError, match=r"malformed override 'train\.lr'.*key=value"):
        apply_overrides(base, ["train.lr"])
    with pytest.raises(ConfigError, match=r"empty part"):
        apply_overrides(base, ["train..lr=1"])
    with pytest.raises(ConfigError, match=r"train\.lr=0\.1 is not a mapping"):
        apply_overrides(base, ["train.lr.x=1"])
    with pytest.raises(TypeError, match=r"model\.dim='64' must be int"):
        from_dict(Config, apply_overrides(base, ["model.dim='64'"]))


def test_round_trip_save_load(tmp_path) -> None:
    cfg = Config(
        model=Model(
            dim=96, n_heads=3, norm="layer", dropout=0.25, moe=MoE(8, 2), attn_layers=[1], window=(4, 0)
        ),
        train=Train(lr=1e-5, steps=7, compile=True, name="1e3"),  # a str that YAML 1.2 would read as a float
    )
    path = tmp_path / "sub" / "config.yaml"
    save_yaml(cfg, path)
    assert from_dict(Config, load_yaml(path)) == cfg
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left
    assert to_dict(cfg)["model"]["window"] == [4, 0]
    save_yaml({"a": (1, 2), "b": "naïve", "c": "no"}, path)
    assert load_yaml(path) == {"a": [1, 2], "b": "naïve", "c": "no"}
    path.write_text("model:\n  dim: 48\n  n_heads: 4\n")
    assert load_config(Config, path, ["model.n_heads=6", "train.lr=2e-2"]) == Config(
        Model(48, 6), Train(lr=0.02)
    )


def test_load_yaml_errors(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: 3\n dim: [\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad\.yaml line \d+, column \d+"):
        load_yaml(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("model:\n  dim: 3\n  dim: 4\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'dim'"):
        load_yaml(dup)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"top level of a config must be a mapping"):
        load_yaml(listed)
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}
    with pytest.raises(FileNotFoundError):
        load_yaml(tmp_path / "missing.yaml")


def test_presets_by_exact_name() -> None:
    presets = {"debug": Model(dim=32, n_heads=2), "small": Model(dim=128, n_heads=4)}
    got = pick_preset(presets, "debug")
    assert got == presets["debug"] and got is not presets["debug"]
    with pytest.raises(
        ConfigError,
        match=r"unknown preset 'debg' \(did you mean 'debug'\?\); available: \['debug', 'small'\]",
    ):
        pick_preset(presets, "debg")
    with pytest.raises(ConfigError, match=r"available"):
        pick_preset(presets, "smal-ish-model-xl")  # no fuzzy substring match
    merged = merge_preset({"preset": "debug", "n_heads": 4}, presets, path="model")
    cfg = from_dict(Model, merged, "model")
    assert cfg == dataclasses.replace(presets["debug"], n_heads=4)
    assert merge_preset({"dim": 8}, presets) == {"dim": 8}


def test_import_has_no_side_effects_and_yaml_is_optional(tmp_path, monkeypatch) -> None:
    import subprocess
    import sys

    code = "import sys, vermeil.config; assert 'yaml' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(ImportError, match=r"pip install vermeil\[train\]"):
        load_yaml(tmp_path / "c.yaml")
    with pytest.raises(ImportError, match=r"pip install vermeil\[train\]"):
        save_yaml({"a": 1}, tmp_path / "c.yaml")
    assert from_dict(Train, {"lr": 1}) == Train(lr=1.0)  # the converter itself needs no YAML


def test_quoted_number_hint_only_for_strings_that_are_numbers() -> None:
    @dataclass
    class Rate:
        lr: float = 1e-3

    with pytest.raises(ConfigError) as info:
        from_dict(Rate, {"lr": "fast"}, path="train")
    assert "lr='fast' must be float" in str(info.value) and "quoted number" not in str(info.value)
    with pytest.raises(ConfigError, match="a quoted number is a string in YAML"):
        from_dict(Rate, {"lr": "3e-4"}, path="train")
