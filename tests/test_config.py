"""Config: every shipped YAML loads; every mistake names its field; overrides address list items by name."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorag.config import ConfigError, apply_override, load_config
from lorag.reference import reference, reference_markdown

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "examples").rglob("lorag.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_load_with_absolute_paths(path):
    cfg = load_config(path)
    assert Path(cfg.workdir).is_absolute()
    for kb in cfg.knowledge_bases:
        assert all(Path(s).is_absolute() and Path(s).exists() for s in kb.sources), kb.sources
    for ad in cfg.adapters:
        assert Path(ad.dataset).is_file(), ad.dataset


def test_shipped_config_list_is_not_empty():
    assert SHIPPED, "examples/ must ship at least the quickstart lorag.yaml"


def _write(tmp_path, data) -> Path:
    p = tmp_path / "lorag.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


BASE = {
    "knowledge_bases": [{"name": "kb", "sources": ["docs/"]}],
    "adapters": [{"name": "bot", "dataset": "d.jsonl", "knowledge_base": "kb"}],
}


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["adapters"][0]["lora"].update(rank=8), "adapters.0.lora.rank: unknown key"),
        (lambda d: d["knowledge_bases"][0].update(chunkin={}), "knowledge_bases.0.chunkin: unknown key; did you mean `chunking`?"),
        (lambda d: d["adapters"][0]["train"].update(raft={"distractor": 2}), "adapters.0.train.raft.distractor: unknown key; did you mean `distractors`?"),
        (lambda d: d["adapters"][0]["train"].update(zero_stage=5), "adapters.0.train.zero_stage"),
        (lambda d: d["adapters"][0]["lora"].update(r=0), "adapters.0.lora.r: Input should be greater than or equal to 1 (got 0)"),
        (lambda d: d["adapters"][0].update(knowledge_base="nope"), "adapters.0.knowledge_base: 'nope' is not a knowledge base"),
        (lambda d: d["adapters"][0].update(name="../evil"), "adapters.0.name: invalid adapter name '../evil'"),
        (lambda d: d["knowledge_bases"][0].update(chunking={"size": 100, "overlap": 100}), "knowledge_bases.0.chunking: overlap (100) must be smaller than size (100)"),
        (lambda d: d["serve"].update(port=70000), "serve.port"),
        (lambda d: d.update(adapter=[]), "adapter: unknown key"),
        (lambda d: d["adapters"][0]["train"].update(offload_params=True, zero_stage=2), "adapters.0.train: offload_params needs zero_stage: 3"),
        (lambda d: d["adapters"][0]["train"].update(offload_optimizer=True, zero_stage=0), "offload_optimizer needs zero_stage >= 1"),
        (lambda d: d["adapters"][0]["train"].update(precision="bf16"), "precision bf16 needs use_gpu: true"),
        (lambda d: d["adapters"][0].update(method="qlora"), "adapters.0.method: Input should be 'lora' or 'full'"),
        (lambda d: d["adapters"][0].update(name="auto"), "adapter name 'auto' is reserved"),
        (lambda d: d["adapters"][0].update(answer_style="(unclosed"), "answer_style is not a regular expression"),
        (lambda d: d["adapters"][0].update(knowledge_base=None, train={"raft": {}}), "train.raft needs a knowledge_base"),
        (lambda d: d["adapters"][0]["train"].update(raft={"oracle_fraction": 1.5}), "adapters.0.train.raft.oracle_fraction"),
        (lambda d: d["serve"].update(route_threshold=2), "serve.route_threshold"),
    ],
)
def test_errors_name_the_field(tmp_path, mutate, expected):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["adapters"][0].update(lora={}, train={})
    data["serve"] = {}
    mutate(data)
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, data))
    assert expected in str(e.value), str(e.value)


def test_every_problem_is_listed_at_once(tmp_path):
    data = {"base_modle": "x", "serve": {"port": 0, "replicas": 0}}
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, data))
    msg = str(e.value)
    assert "3 problem(s)" in msg and "base_modle" in msg and "serve.port" in msg and "serve.replicas" in msg, msg
    assert "base_modle: unknown key; did you mean `base_model`?" in msg and msg.count("lorag config") == 1, msg


@pytest.mark.parametrize("text, expected", [("a: [1,\n", "not valid YAML"), ("- 1\n- 2\n", "top level must be a mapping")])
def test_unparseable_files_are_config_errors(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "docs").mkdir()
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.knowledge_bases[0].sources == [str(tmp_path / "docs")]
    assert cfg.adapters[0].dataset == str(tmp_path / "d.jsonl")
    assert cfg.workdir == str(tmp_path / ".lorag")
    assert cfg.milvus_uri(cfg.knowledge_bases[0]) == str(tmp_path / ".lorag" / "milvus.db")


def test_ranking_settings_default_to_the_tuned_values_and_take_overrides(tmp_path):
    kb = load_config(_write(tmp_path, BASE)).knowledge_bases[0]
    h = kb.hybrid
    assert (h.fusion, h.rrf_k, h.dense_weight, h.lexical_floor, kb.max_per_source, kb.source_weight) == ("rrf", 30, 1.5, 0.5, 1, 0.1), \
        "unset: the tuned defaults of docs/benchmarks.md, visible in the config itself"
    kb = load_config(_write(tmp_path, BASE), ["knowledge_bases.kb.hybrid.dense_weight=2", "knowledge_bases.kb.max_per_source=null"]).knowledge_bases[0]
    assert (kb.hybrid.dense_weight, kb.hybrid.rrf_k, kb.max_per_source) == (2.0, 30, None), "an override changes only its own field"
    with pytest.raises(ConfigError, match="knowledge_bases.0.hybrid.lexical_floor"):
        load_config(_write(tmp_path, BASE), ["knowledge_bases.kb.hybrid.lexical_floor=2"])


def test_overrides_by_index_and_by_name(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["adapters.bot.train.max_steps=7", "adapters.0.lora.r=4", "serve.port=9001"])
    assert (cfg.adapters[0].train.max_steps, cfg.adapters[0].lora.r, cfg.serve.port) == (7, 4, 9001)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("serve.port", "must look like key.path=value"),
        ("adapters.ghost.train.max_steps=1", "no list item 'ghost'"),
        ("serve.port.x=1", "is a value, not a section"),
        ("serve.port=abc", "serve.port: Input should be a valid integer"),
        ("serve.prot=1", "override 'serve.prot=1': serve.prot: unknown key; did you mean `port`?"),
        ("adapters.bot.trian.max_steps=1", "adapters.bot.trian: unknown key; did you mean `train`?"),
    ],
)
def test_bad_overrides(tmp_path, override, expected):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["serve"] = {"port": 8000}
    with pytest.raises(ConfigError, match=expected):
        load_config(_write(tmp_path, data), [override])


def test_apply_override_parses_yaml_values():
    d = {"a": {"b": 1}}
    apply_override(d, "a.c=[x, y]")
    apply_override(d, "a.b=true")
    assert d == {"a": {"b": True, "c": ["x", "y"]}}


# -- the reference: `lorag config`, `lorag config --check`, docs/config.md ---------------------------

CLI = [sys.executable, "-m", "lorag.cli", "config"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "100"}, timeout=120)


def test_every_field_and_section_is_described():
    sections = reference()
    missing = [f.path for s in sections for f in s.fields if not f.description.strip()]
    missing += [s.path or "(top level)" for s in sections if not s.doc]
    assert not missing, f"give these a Field(description=...) (or a docstring, for a section): {missing}"


def test_reference_walks_nested_models_lists_and_dicts():
    fields = {f.path: f for s in reference() for f in s.fields}
    assert {"knowledge_bases[].chunking.size", "adapters[].lora.target_modules", "adapters[].train.raft.cite", "serve.api_keys[].sha256"} <= set(fields)
    assert (fields["adapters[].train.zero_stage"].type, fields["adapters[].train.zero_stage"].default) == ("0 | 1 | 2 | 3", "2")
    assert fields["adapters[].lora.r"].type == "int (>= 1, <= 512)"
    assert fields["cluster.env_vars"].type == "dict[str, str]" and fields["knowledge_bases[].name"].default == "required"
    assert fields["k8s.gpu_workers.gpus"].default == "1", "a section's fields show the default its parent gives it"


def test_lorag_config_prints_every_field_with_its_description():
    r = _cli()
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join(r.stdout.split())  # descriptions are wrapped to the terminal
    for path in ("adapters[].lora.target_modules", "adapters[].train.zero_stage", "k8s.storage", "knowledge_bases[].chunking.size"):
        assert path in out, f"{path} missing from `lorag config`"
    for f in (f for s in reference() for f in s.fields):
        assert f"{f.path} {f.type}" in out and " ".join(f.description.split()) in out, f"{f.path}: path, type and description printed"


def test_docs_config_md_is_current():
    docs = REPO / "docs" / "config.md"
    assert docs.is_file() and docs.read_text() == reference_markdown(), (
        "docs/config.md differs from the config models: regenerate it with `lorag config --markdown > docs/config.md`"
    )
    r = _cli("--markdown")
    assert r.returncode == 0 and r.stdout == reference_markdown(), r.stderr


def test_check_a_valid_config():
    r = _cli("--check", "examples/quickstart/lorag.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "examples/quickstart/lorag.yaml: valid (1 knowledge bases, 1 adapters)", r.stdout


@pytest.mark.parametrize(
    "key, override, expected",
    [
        ("chunkin", None, "knowledge_bases.0.chunkin: unknown key; did you mean `chunking`?"),
        (None, "knowledge_bases.kb.chunkin.size=64", "override 'knowledge_bases.kb.chunkin.size=64': knowledge_bases.kb.chunkin: unknown key; did you mean `chunking`?"),
    ],
)
def test_check_a_typo_is_a_field_error_with_a_suggestion(tmp_path, key, override, expected):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    if key:
        data["knowledge_bases"][0][key] = {"size": 64}
    r = _cli("--check", str(_write(tmp_path, data)), *(["--set", override] if override else []))
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert expected in " ".join(out.split()) and "`lorag config` or docs/config.md lists every field" in out, out
    assert "Traceback" not in out, out
