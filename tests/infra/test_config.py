"""Config loading: YAML + overrides, errors that name the field, secrets kept out of logs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from infra.config import (
    ConfigError,
    Section,
    apply_overrides,
    fingerprint,
    load,
    public_dict,
    redact_uri,
)
from pipelines.config import PipelineConfig, load_pipeline_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_demo_config_loads_with_every_fixed_top_level_key() -> None:
    config = load_pipeline_config(REPO / "configs" / "demo.yaml")
    assert config.corpus.inputs[0].format == "jsonl"
    assert set(PipelineConfig.model_fields) >= {
        "workspace", "corpus", "storage", "mlflow", "ray",
        "shard", "tokenizers", "pretokenize", "model", "train", "eval",
    }  # fmt: skip


def test_overrides_are_typed_and_nested() -> None:
    data = apply_overrides(
        {"shard": {"target_tokens": 10}},
        ["shard.target_tokens=3e4", "ray.address=ray://h:10001", "a.b.c=true", "t.lr=3e-4"],
    )
    assert data["shard"]["target_tokens"] == 3e4
    assert data["ray"]["address"] == "ray://h:10001"
    assert data["a"]["b"]["c"] is True
    assert data["t"]["lr"] == 3e-4


def test_overrides_index_into_lists() -> None:
    data = {"corpus": {"inputs": [{"uri": "a", "format": "jsonl"}, {"uri": "b"}]}}
    changed = apply_overrides(data, ["corpus.inputs.1.format=obelics", "corpus.inputs.0.uri=z"])
    assert changed["corpus"]["inputs"] == [{"uri": "z", "format": "jsonl"},
                                           {"uri": "b", "format": "obelics"}]  # fmt: skip
    assert data["corpus"]["inputs"][0]["uri"] == "a"  # the input is not modified
    with pytest.raises(ConfigError, match="corpus.inputs.5: no such list item"):
        apply_overrides(data, ["corpus.inputs.5.uri=x"])


def test_override_into_a_scalar_is_refused() -> None:
    with pytest.raises(ConfigError, match="workspace is not a section"):
        apply_overrides({"workspace": "w"}, ["workspace.x=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["no-equals-sign"])


def test_unknown_key_is_named_with_its_dotted_path(tmp_path: Path) -> None:
    path = write(tmp_path, "corpus: {inputs: [{uri: a.jsonl, format: jsonl}]}\nshard: {targt: 1}\n")
    with pytest.raises(ConfigError) as error:
        load_pipeline_config(path)
    assert f"{path}: shard.targt: unknown key" in str(error.value)


def test_bad_value_is_named_with_field_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "corpus: {inputs: [{uri: a.jsonl, format: csv}]}\n")
    with pytest.raises(ConfigError) as error:
        load_pipeline_config(path, ["shard.target_tokens=-5"])
    message = str(error.value)
    assert "corpus.inputs.0.format" in message and "'csv'" in message
    assert "shard.target_tokens: Input should be greater than 0 (got -5)" in message


def test_missing_section_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="corpus: Field required"):
        load_pipeline_config(write(tmp_path, "workspace: w\n"))
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_pipeline_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_pipeline_config(write(tmp_path, "- a\n- b\n"))


def test_a_misspelt_stage_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, "corpus: {inputs: [{uri: a, format: jsonl}]}\ntrain: {lrr: 1}\n")
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        load_pipeline_config(path)


class WithSecret(Section):
    token: SecretStr
    tracking_uri: str


def test_secrets_never_reach_printable_form(tmp_path: Path) -> None:
    path = write(tmp_path, "token: hunter2\ntracking_uri: http://alice:pa55w0rd@127.0.0.1:5000\n")
    config = load(WithSecret, path)
    shown = public_dict(config)
    assert shown == {"token": "***", "tracking_uri": "http://***@127.0.0.1:5000"}
    assert "hunter2" not in repr(config) and "hunter2" not in str(shown)
    assert "pa55w0rd" not in str(shown)
    with pytest.raises(ConfigError) as error:
        load(WithSecret, write(tmp_path, "token: [1]\ntracking_uri: x\n"))
    assert "token" in str(error.value)


def test_redact_uri_keeps_uris_without_userinfo() -> None:
    assert redact_uri("s3://bucket/key") == "s3://bucket/key"
    assert redact_uri("postgresql://u:p@db/x") == "postgresql://***@db/x"
    assert redact_uri(None) is None


def test_fingerprint_is_stable_and_sensitive() -> None:
    config = load_pipeline_config(REPO / "configs" / "demo.yaml")
    changed = load_pipeline_config(REPO / "configs" / "demo.yaml", ["shard.target_tokens=7"])
    assert fingerprint(config.shard, [1]) == fingerprint(config.shard, [1])
    assert fingerprint(config.shard, [1]) != fingerprint(changed.shard, [1])
    assert fingerprint(config.shard, [1]) != fingerprint(config.shard, [2])
