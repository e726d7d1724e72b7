"""Training data (masking, malformed lines) and a real Ray Train + DeepSpeed run that yields a plain PEFT adapter."""

import json

import pytest

from lorag.train import IGNORE_INDEX, DatasetError, encode_example, load_examples


@pytest.mark.parametrize(
    "line, expected",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"prompt": "q"}', "missing or empty: ['completion']"),
        ('{"prompt": "", "completion": "a"}', "missing or empty: ['prompt']"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0] must be"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "the last message must be the assistant's answer"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, expected):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "ok", "completion": "fine"}\n\n' + line + "\n")
    with pytest.raises(DatasetError) as e:
        load_examples(f)
    assert f"{f}:3: " in str(e.value) and expected in str(e.value), str(e.value)


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_examples(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no examples"):
        load_examples(tmp_path / "e.jsonl")


def test_only_the_answer_carries_loss(smollm2_path):
    from lorag.models import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    ex = {"messages": [{"role": "user", "content": "Where is Marrowick?"}, {"role": "assistant", "content": "Tidewell Support: by the sea."}]}
    enc = encode_example(tok, ex, "Be brief.", 512)
    assert len(enc.input_ids) == len(enc.labels) and not enc.truncated
    first = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in enc.labels[:first])
    assert enc.labels[first:] == enc.input_ids[first:]
    prompt = tok.decode(enc.input_ids[:first])
    answer = tok.decode(enc.labels[first:])
    assert "Be brief." in prompt and "Where is Marrowick?" in prompt and prompt.rstrip().endswith("assistant")
    assert answer.startswith("Tidewell Support: by the sea.") and tok.eos_token in answer, "the end-of-turn token is learned too"
    short = encode_example(tok, ex, None, 8)
    assert short.truncated and len(short.input_ids) == 8
    kept = [t for t in short.labels if t != IGNORE_INDEX]
    assert kept and tok.decode(kept).startswith("Tidewell"), "truncation keeps the start of the answer, which carries the loss"
    assert short.input_ids[: len(short.input_ids) - len(kept)] == enc.input_ids[first - (8 - len(kept)) : first], "the prompt keeps its end"


@pytest.mark.slow
def test_two_steps_on_ray_train_make_a_peft_adapter_that_changes_the_model(ray_session, make_config, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorag.data import ingest
    from lorag.train import train_adapter

    cfg = make_config()
    with pytest.raises(LookupError, match="run `lorag ingest` first"):
        train_adapter(cfg, "support")  # bound to a knowledge base that does not exist yet
    ingest(cfg, "handbook")
    r1 = train_adapter(cfg, "support")
    assert r1.version == 1 and r1.path.name == "v1"
    assert {p.name for p in r1.path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "lorag.json", "lorag.yaml"}
    assert not list(r1.path.glob("*.bin")) and not list(r1.path.glob("*.pt")), "only safetensors are saved"
    meta = json.loads((r1.path / "lorag.json").read_text())
    assert meta["base_model"] == str(tiny_model) and meta["knowledge_base"] == "handbook" and meta["trained_with_retrieval"] is True
    assert meta["metrics"]["steps"] == 2 and len(meta["metrics"]["loss_curve"]) == 2 and meta["metrics"]["world_size"] == 2

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, str(r1.path))
        after = tuned(ids).logits
    assert not torch.allclose(before, after), "the trained adapter must change the base model's output"

    cfg.adapters[0].train.with_retrieval = False
    r2 = train_adapter(cfg, "support")
    assert r2.version == 2 and r1.path.exists(), "a second run makes a new version and keeps the first"
    assert json.loads((r2.path / "lorag.json").read_text())["trained_with_retrieval"] is False


def test_retrieved_sources_wrap_the_question_as_serving_does(ray_session, make_config):
    from lorag.data import ingest
    from lorag.train import with_retrieved_sources

    cfg = make_config()
    ingest(cfg, "handbook")
    ex = {"messages": [{"role": "user", "content": "How long is the Tidewell T4 warranty?"}, {"role": "assistant", "content": "Tidewell Support: 39 months."}]}
    (out,) = with_retrieved_sources(cfg, cfg.adapters[0], [ex])
    user, answer = out["messages"]
    assert answer == ex["messages"][1], "the answer is never changed"
    assert user["content"].startswith("Answer the question using the numbered sources") and "[1] " in user["content"] and "[2] " in user["content"]
    assert user["content"].endswith("Question: How long is the Tidewell T4 warranty?")
    assert "39" in user["content"], "the warranty passage was retrieved into the prompt"
