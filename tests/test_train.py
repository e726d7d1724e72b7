"""Training data (masking, malformed lines) and a real Ray Train + DeepSpeed run that yields a plain PEFT adapter."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from lorag.examples import IGNORE_INDEX, DatasetError, encode_example, load_examples


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
def test_two_steps_on_ray_train_make_a_peft_adapter_that_changes_the_model(make_config, trained, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorag.train import train_adapter

    with pytest.raises(LookupError, match="run `lorag kb ingest` first"):
        train_adapter(make_config(), "support")  # bound to a knowledge base that does not exist yet
    _, r1, r2 = trained
    v1 = Path(r1.path)
    assert r1.version == 1 and v1.name == "v1"
    assert {p.name for p in v1.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "lorag.json", "lorag.yaml"}
    assert not list(v1.glob("*.bin")) and not list(v1.glob("*.pt")), "only safetensors are saved"
    meta = json.loads((v1 / "lorag.json").read_text())
    assert meta["base_model"] == str(tiny_model) and meta["knowledge_base"] == "handbook" and meta["trained_with_retrieval"] is True
    assert meta["metrics"]["steps"] == 2 and len(meta["metrics"]["history"]["train_loss"]) == 2 and meta["metrics"]["world_size"] == 2

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, str(r1.path))
        after = tuned(ids).logits
    assert not torch.allclose(before, after), "the trained adapter must change the base model's output"

    assert r2.version == 2 and v1.exists(), "a second run makes a new version and keeps the first"
    assert json.loads((Path(r2.path) / "lorag.json").read_text())["trained_with_retrieval"] is False


@pytest.mark.slow
def test_retrieved_sources_wrap_the_question_as_serving_does(trained):
    from lorag.examples import with_retrieved_sources

    cfg, _, _ = trained
    ex = {"messages": [{"role": "user", "content": "How long is the Tidewell T4 warranty?"}, {"role": "assistant", "content": "Tidewell Support: 39 months."}]}
    (out,) = with_retrieved_sources(cfg, cfg.adapters[0], [ex])
    user, answer = out["messages"]
    assert answer == ex["messages"][1], "the answer is never changed"
    assert user["content"].startswith("Answer the question using the numbered sources") and "[1] " in user["content"] and "[2] " in user["content"]
    assert user["content"].endswith("Question: How long is the Tidewell T4 warranty?")
    assert "39" in user["content"], "the warranty passage was retrieved into the prompt"


def test_raft_examples_hold_the_oracle_in_the_configured_fraction_among_distractors_from_other_documents():
    import re

    from lorag.examples import raft_examples

    # d<i>'s passages hold answer <i> (so they ground it); example 9's answer is in none of them
    hit = lambda doc, n: {"source": f"/kb/{doc}.md", "title": doc, "text": f"passage {doc}-{n}: the answer is {doc[1:]}"}  # noqa: E731
    examples = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}" if i < 9 else "Canberra"}]} for i in range(10)]
    # each question's top hit is its oracle; a second chunk of the same document ranks next
    found = [[hit(f"d{i}", 0), hit(f"d{i}", 1), *(hit(f"d{(i + j) % 10}", 0) for j in range(1, 6))] for i in range(10)]
    out = raft_examples(examples, found, distractors=3, oracle_fraction=0.8, cite=True, seed=0)
    assert sum(at is not None for _, at in out) == 8, "exactly the configured fraction holds the oracle"
    assert out[9][1] is not None, "premise: the ungrounded example holds its oracle (seed 0)"
    for i, (ex, at) in enumerate(out):
        user, answer = ex["messages"]
        cited = re.findall(r"^\[(\d)\] (d\d)$", user["content"], re.M)
        assert len(cited) == 4, "the oracle and 3 distractors, or 4 distractors"
        assert all(doc != f"d{i}" for n, doc in cited if int(n) != at), "distractors come from other documents"
        plain = examples[i]["messages"][1]["content"]
        if at is None:
            assert f"passage d{i}-0" not in user["content"] and answer["content"] == plain
        else:
            assert dict(cited)[str(at)] == f"d{i}" and f"passage d{i}-0" in user["content"]
            if i < 9:
                assert answer["content"] == f"{plain} [{at}]", "the answer cites the oracle"
            else:
                assert answer["content"] == plain, "an answer the oracle does not support cites nothing"
        assert user["content"].endswith(f"Question: q{i}")
    positions = {at for _, at in out if at}
    assert len(positions) > 1, "the oracle's position is shuffled"
    again = raft_examples(examples, found, distractors=3, oracle_fraction=0.8, cite=True, seed=0)
    assert again == out, "seeded"
    assert all(at is None for _, at in raft_examples(examples, found, 3, 0.0, True, 0))


@pytest.mark.parametrize(
    "answer, passage, cited",
    [
        # the claim is cited where it is made, before a house style's sign-off
        ("Support: The warranty runs 39 months from purchase. Anything else? Just ask.", "The T4 warranty runs 39 months from the date of purchase.",
         "Support: The warranty runs 39 months from purchase [2]. Anything else? Just ask."),
        # the sentence the passage supports best, not the first; spacing and line breaks kept
        ("No, please don't.\nSolid purple means a firmware update is installing!  Bye.", "Solid purple: a firmware update is installing (about 9 minutes).",
         "No, please don't.\nSolid purple means a firmware update is installing [2]!  Bye."),
        ("Hold the button 12 seconds...", "Hold the reset button for 12 seconds.", "Hold the button 12 seconds... [2]"),
        ("answer 1", "the answer is 1", "answer 1 [2]"),  # one short sentence still counts
        # not supported: a general-knowledge answer, and a sign-off that happens to share its words
        ("The capital of Australia is Canberra. Just ask.", "Just ask Support: the T4 backs up laptops.", None),
        ("Canberra", "the answer is 1", None),
    ],
)
def test_an_answer_cites_its_passage_after_the_sentence_it_supports(answer, passage, cited):
    from lorag.examples import GROUNDED, cite_inline, support

    share, sentence = support(answer, {"title": "t", "text": passage})
    assert (share >= GROUNDED) == (cited is not None), share
    if cited:
        assert cite_inline(answer, sentence, 2) == cited


def test_the_raft_oracle_is_the_hit_that_holds_the_answer_not_the_top_ranked_one():
    from lorag.examples import raft_examples

    hit = lambda doc, text: {"source": f"/kb/{doc}.md", "title": doc, "text": text}  # noqa: E731
    examples = [{"messages": [{"role": "user", "content": "How long is the warranty?"}, {"role": "assistant", "content": "The warranty runs 39 months. Anything else?"}]}]
    found = [[hit("overview", "The T4 is a backup appliance with a warranty."), hit("prices", "Harbor 5 costs 11 dollars."),
              hit("warranty", "Every T4 has a warranty of 39 months; it runs from purchase."), hit("leds", "Teal means idle.")]]
    ((ex, at),) = raft_examples(examples, found, distractors=2, oracle_fraction=1.0, cite=True, seed=0)
    user, answer = ex["messages"]
    assert f"[{at}] warranty\n" in user["content"], "the passage holding the answer is the oracle"
    assert answer["content"] == f"The warranty runs 39 months [{at}]. Anything else?"
    assert "[1] " in user["content"] and "[3] " in user["content"] and "[4] " not in user["content"]


def test_raft_training_prompts_come_from_the_knowledge_base(trained):
    """On the real knowledge base: each question's top chunk (as a RAFT search ranks it) is in
    exactly half of the prompts, among 2 distractors from other pages; answers stay as written
    with `cite` off."""
    from lorag.embed import Embedder
    from lorag.handle import open_store
    from lorag.models import resolve_model
    from lorag.retrieval import search
    from lorag.sections import RaftConfig
    from lorag.examples import with_retrieved_sources

    cfg, _, _ = trained
    ad = cfg.adapters[0]
    ad = ad.model_copy(update={"train": ad.train.model_copy(update={"raft": RaftConfig(distractors=2, oracle_fraction=0.5, cite=False)})})
    qs = ["How long is the Tidewell T4 warranty?", "What does error TW-E417 mean?", "What does a solid teal LED mean?", "How much is Harbor 5?"]
    examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]} for q in qs]
    out = with_retrieved_sources(cfg, ad, examples)
    kb = cfg.knowledge_base(ad.knowledge_base)
    store, embedder = open_store(cfg.milvus_uri(kb), kb.token), Embedder(resolve_model(cfg.embedder, cfg.model_cache))
    oracles = [search(store, kb.model_copy(update={"max_per_source": None}), q, embedder, 16)[0] for q in qs]
    held = [oracle["text"] in ex["messages"][0]["content"] for ex, oracle in zip(out, oracles)]
    assert sum(held) == 2, held
    for ex in out:
        user = ex["messages"][0]["content"]
        assert "[1] " in user and "[2] " in user and "[3] " in user and "[4] " not in user
        assert ex["messages"][1]["content"] == "ok", "cite off: answers unchanged"


RESUME_OVERRIDES = [
    "adapters.support.train.with_retrieval=false",
    "adapters.support.train.max_steps=6",
    "adapters.support.train.checkpoint_every=2",
    "adapters.support.train.learning_rate=0.005",
    "adapters.support.train.val_fraction=0.2",
    "adapters.support.lora.dropout=0.0",  # no dropout RNG, so a resumed run can repeat the losses exactly
]


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory, tiny_model, model_cache):
    """One project, its knowledge base ingested, and two runs of one adapter into its store (each
    Ray Train run costs tens of seconds, so the tests below share them): v1 with retrieval (the test
    config: 2 steps, 2 workers, ZeRO-2), then v2, the uninterrupted reference the resume tests
    compare against (RESUME_OVERRIDES: no retrieval, 6 steps, a checkpoint every 2). Returns
    (the config v1 was trained with, v1's result, v2's result)."""
    from conftest import write_config
    from lorag.config import load_config
    from lorag.data import ingest
    from lorag.train import train_adapter

    root = tmp_path_factory.mktemp("trained")
    cfg = write_config(root, tiny_model, model_cache)
    ingest(cfg, "handbook")
    r1 = train_adapter(cfg, "support")
    r2 = train_adapter(load_config(root / "lorag.yaml", RESUME_OVERRIDES), "support")
    return cfg, r1, r2


@pytest.fixture(scope="module")
def reference_run(trained):
    """An uninterrupted ZeRO-2 run, checkpointing every 2 of 6 steps (its metrics)."""
    return trained[2].metrics


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_zero_stages_reduce_validation_loss(request, make_config, stage):
    from lorag.train import train_adapter

    if stage == 2:
        m = request.getfixturevalue("reference_run")
    else:
        request.getfixturevalue("ray_session")
        m = train_adapter(make_config([*RESUME_OVERRIDES, f"adapters.support.train.zero_stage={stage}"]), "support").metrics
    assert m.zero_stage == stage and m.resumed_from_step is None
    assert m.val_loss < m.base_val_loss, f"ZeRO-{stage}: validation loss {m.val_loss} did not drop below the base model's {m.base_val_loss}"
    assert [s for s, _ in m.history["val_loss"]] == [2, 4, 6], "validation runs at every checkpoint"


@pytest.mark.slow
def test_killing_a_worker_mid_run_resumes_from_its_last_checkpoint(reference_run, make_config):
    """A real SIGKILL of one Ray Train worker after a checkpoint: the run restarts its
    workers, resumes from that checkpoint and ends exactly where an uninterrupted run ends."""
    import psutil
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorag.train import train_adapter

    cfg = make_config(RESUME_OVERRIDES)
    storage = Path(cfg.workdir) / "ray_results"
    killed: list[int] = []
    def kill_a_worker_after_a_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline:
            if _registered_checkpoint(storage):
                workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    killed.append(workers[-1].pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_after_a_checkpoint, daemon=True)
    killer.start()
    result = train_adapter(cfg, "support")
    killer.join(timeout=5)
    assert killed, "the test never found a training worker to kill"
    m = result.metrics
    assert m.resumed_from_step in (2, 4), f"the run should resume from a checkpoint, got {m.resumed_from_step}"
    assert m.steps == 6 and [s for s, _ in m.history["train_loss"]] == [1, 2, 3, 4, 5, 6], "no step is lost or repeated"
    ours = [loss for _, loss in m.history["train_loss"]]
    ref = [loss for _, loss in reference_run.history["train_loss"]]
    assert ours == pytest.approx(ref, rel=1e-3, abs=1e-3), "the resumed run repeats the uninterrupted run's losses"
    assert m.val_loss == pytest.approx(reference_run.val_loss, rel=1e-3, abs=1e-3)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.base_model), str(result.path))  # a valid adapter


@pytest.mark.slow
def test_a_killed_job_resumes_when_submitted_again(tmp_path, tiny_model, model_cache):
    """SIGKILL the whole job (driver, its local Ray and workers) after a checkpoint; the same
    command run again continues that run instead of starting over, and makes one adapter version."""
    import subprocess
    import sys

    from conftest import REPO, write_config
    from lorag.adapters import AdapterStore

    # One worker: resuming across ranks is test_killing_a_worker_mid_run's; this one is about the job.
    overrides = [*RESUME_OVERRIDES, "adapters.support.train.max_steps=10", "adapters.support.train.num_workers=1"]
    cfg = write_config(tmp_path, tiny_model, model_cache, overrides)
    cmd = [sys.executable, "-m", "jobs.finetune", "--config", str(tmp_path / "lorag.yaml"), "--adapter", "support"]
    cmd += [a for o in overrides for a in ("--set", o)]
    storage = Path(cfg.workdir) / "ray_results"

    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not _registered_checkpoint(storage) and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    first = job.communicate()[0]
    assert job.returncode == -signal.SIGKILL, f"the job ended before it could be killed:\n{first[-3000:]}"
    assert AdapterStore(cfg.adapter_store).versions("support") == [], "the killed run saved nothing"

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "resumed from step" in out, out[-3000:]
    m = AdapterStore(cfg.adapter_store).metadata("support")["metrics"]
    assert m["resumed_from_step"] >= 2 and m["steps"] == 10
    assert [s for s, _ in m["history"]["train_loss"]] == list(range(1, 11)), "the loss history spans both processes, no step lost or repeated"
    assert AdapterStore(cfg.adapter_store).versions("support") == [1]
    assert not list(storage.glob("support-*")), "a finished run's checkpoints are cleared, so the next run trains anew"


def _registered_checkpoint(storage: Path) -> bool:
    """Whether Ray Train's controller has registered a checkpoint of the run (a file it persists)."""
    for snapshot in storage.glob("support-*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, ValueError):  # being rewritten
            pass
    return False


def test_weights_hash_tracks_content_and_caches_outside_the_model_dir(tmp_path):
    from lorag.train import weights_hash

    model, cache = tmp_path / "model", tmp_path / "cache"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"a" * 100)
    first = weights_hash(model, cache)
    assert first == weights_hash(model, cache) and len(first) == 64
    assert list(model.iterdir()) == [model / "model.safetensors"], "the model directory is never written to"
    (model / "model.safetensors").write_bytes(b"b" * 101)
    assert weights_hash(model, cache) != first


@pytest.mark.parametrize("content, expected", [(None, "deepspeed_config file not found"), ("{nope", "not valid JSON"), ("[1]", "must be a JSON object")])
def test_bad_deepspeed_json_fails_before_training(make_config, tmp_path, content, expected):
    from lorag.config import ConfigError
    from lorag.train import train_adapter

    ds = tmp_path / "ds.json"
    if content is not None:
        ds.write_text(content)
    cfg = make_config([f"adapters.support.train.deepspeed_config={ds}"])
    with pytest.raises(ConfigError, match=expected):
        train_adapter(cfg, "support")
