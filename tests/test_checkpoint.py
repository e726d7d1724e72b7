"""Pickle-free training checkpoints (`lorag.checkpoint`): a resumed run repeats an uninterrupted one
bit for bit, every file is JSON or safetensors, and a corrupt or mismatched checkpoint is refused.

Run: `.venv/bin/python -m pytest -q tests/test_checkpoint.py`. No Ray: two CPU processes join a gloo
group and train a 2-layer, width-32 Llama with a LoRA adapter under DeepSpeed, in each layout
DeepSpeed keeps master weights in: the model itself (stage 0, fp32), an fp32 copy per parameter
(stage 0, bf16), and sharded flat fp32 partitions (ZeRO-2, ZeRO-3; bf16 as on GPUs).
"""

import json
import multiprocessing
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
from conftest import free_port

WORLD = 2
CONFIGS = {"zero0-fp32": (0, False), "zero2-fp32": (2, False), "zero3-fp32": (3, False), "zero0-bf16": (0, True), "zero2-bf16": (2, True)}
BEFORE, AFTER = 2, 2  # optimizer steps before the checkpoint, and after it


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both ranks train, save, resume and try bad checkpoints once; each writes what it saw to results-rank{r}.json."""
    out = tmp_path_factory.mktemp("checkpoint")
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, WORLD, port, str(out))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.time() + 360  # only a hang gets near this: the run takes about 25 s on two idle cores
    for p in procs:
        p.join(timeout=max(deadline - time.time(), 1))
    for p in procs:
        if p.is_alive():  # a rank stuck in a collective after the other failed
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * WORLD, f"worker exit codes {codes}; the traceback is in the captured stderr"
    return out, [json.loads((out / f"results-rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("config", CONFIGS)
def test_a_resumed_run_repeats_the_uninterrupted_run_exactly(runs, config):
    _, results = runs
    for rank, res in enumerate(results):
        r = res[config]
        assert r["resumed_step"] == BEFORE, r
        assert r["resumed_losses"] == r["reference_losses"][BEFORE:], (
            f"{config} rank {rank}: steps {BEFORE + 1}..{BEFORE + AFTER} after a resume gave {r['resumed_losses']}, the "
            f"uninterrupted run {r['reference_losses'][BEFORE:]}: some state (weights, AdamW moments or step, LR schedule, "
            "dropout RNG) was not restored"
        )
        assert r["weights_equal"], f"{config} rank {rank}: final weights differ from the uninterrupted run's by up to {r['max_diff']}"
        assert r["python_random_equal"], f"{config} rank {rank}: Python's random stream was not restored"
        assert r["loaded_over_other_init"], "the resumed engine started from other LoRA weights, so the equality proves the load"


@pytest.mark.parametrize("config", CONFIGS)
def test_every_file_is_json_or_safetensors_and_in_the_manifest(runs, config):
    out, _ = runs
    stage, bf16 = CONFIGS[config]
    ckpt = out / config
    names = sorted(p.name for p in ckpt.rglob("*"))
    rng = [f"rng-rank{r}.safetensors" for r in range(WORLD)]
    assert names == sorted(["manifest.json", "state.json", "weights.safetensors", "optimizer.safetensors", *rng]), names
    for path in ckpt.iterdir():  # each parses as what its name says, so none is a pickle or a torch zip
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            _safetensors_header(path)  # raises on anything that is not a well-formed safetensors file
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world_size"] == WORLD and manifest["zero_stage"] == stage and manifest["version"] == 1
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    weights = _safetensors_header(ckpt / "weights.safetensors")
    assert set(weights) == set(manifest["params"]) and all("lora_" in n for n in weights), "only the trainable LoRA weights are saved"
    assert all(t["dtype"] == "F32" for t in weights.values()), "master weights are fp32"
    moments = _safetensors_header(ckpt / "optimizer.safetensors")
    assert set(moments) == {f"{k}.{n}" for n in weights for k in ("exp_avg", "exp_avg_sq")}, sorted(moments)[:4]
    state = json.loads((ckpt / "state.json").read_text())
    # DeepSpeed's stage-0 bf16 optimizer takes one zero-gradient step when it is built.
    assert state["step"] == BEFORE and state["optimizer"]["step"] == BEFORE + (stage == 0 and bf16), state["optimizer"]
    assert {"last_epoch", "_step_count", "_last_lr", "base_lrs"} <= set(state["scheduler"]) and state["scheduler"]["last_epoch"] == BEFORE
    assert state["extra"] == {"history": [[1, 0.5]], "base_val_loss": None}


def test_load_state_refuses_a_flipped_byte_and_another_adapter_shape(runs):
    _, results = runs
    for rank, res in enumerate(results):
        flipped = res["flipped_byte_error"]
        assert flipped and "weights.safetensors" in flipped and "sha256" in flipped, f"rank {rank}: {flipped}"
        other = res["other_adapter_error"]
        assert other and "does not fit this model" in other and "shape mismatch" in other, f"rank {rank}: {other}"


def test_a_checkpoint_resumes_only_with_its_world_size(runs):
    from lorag.checkpoint import verify

    out, _ = runs
    with pytest.raises(ValueError, match=r"manifest.json: saved by 2 worker\(s\), this run has 1; .* resume with num_workers: 2"):
        verify(out / "zero2-fp32", 1)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: _flip(d / "optimizer.safetensors"), "optimizer.safetensors: sha256"),
        (lambda d: _flip(d / "rng-rank1.safetensors"), "rng-rank1.safetensors: sha256"),
        (lambda d: _flip(d / "state.json"), "state.json: sha256"),
        (lambda d: (d / "weights.safetensors").unlink(), "weights.safetensors: missing"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json: missing"),
        (lambda d: (d / "manifest.json").write_text("{nope"), "manifest.json: not valid JSON"),
        (lambda d: _edit_manifest(d, version=99), "format version 99"),
        (lambda d: _edit_manifest(d, files={"../../etc/passwd": "0" * 64}), "lists files ['../../etc/passwd']"),
    ],
)
def test_verify_names_the_file_and_the_problem(runs, tmp_path, damage, expected):
    from lorag.checkpoint import verify

    out, _ = runs
    ckpt = shutil.copytree(out / "zero2-fp32", tmp_path / "ckpt")
    damage(ckpt)
    with pytest.raises(ValueError) as e:
        verify(ckpt, WORLD)
    assert expected in str(e.value), str(e.value)


# -- the two ranks ---------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    import random
    from datetime import timedelta

    import deepspeed
    import torch

    from lorag.checkpoint import load_state, save_state
    from lorag.worker import skip_shm_comm_build

    torch.set_num_threads(1)  # two ranks on two cores; also keeps CPU kernels' reduction order fixed
    skip_shm_comm_build()  # as lorag.train's CPU workers do
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
    out = Path(out)
    results: dict = {}
    for config, (stage, bf16) in CONFIGS.items():
        ckpt = out / config
        engine = _engine(stage, bf16, lora_seed=1)
        losses = [_step(engine, s, rank) for s in range(1, BEFORE + 1)]
        save_state(engine, ckpt, rank, world, step=BEFORE, extra={"history": [[1, 0.5]], "base_val_loss": None})
        python_draw = random.random()
        # Saving must not disturb the run: carrying on from here is the uninterrupted reference.
        losses += [_step(engine, s, rank) for s in range(BEFORE + 1, BEFORE + AFTER + 1)]
        final = _full_weights(engine)

        engine = _engine(stage, bf16, lora_seed=2)  # another init: only a real load can make it match
        other_init = _full_weights(engine)
        state = load_state(engine, ckpt, rank, world)
        python_equal = random.random() == python_draw
        resumed = [_step(engine, s, rank) for s in range(state["step"] + 1, BEFORE + AFTER + 1)]
        mine = _full_weights(engine)
        results[config] = {
            "reference_losses": losses,
            "resumed_losses": resumed,
            "resumed_step": state["step"],
            "weights_equal": all(torch.equal(final[n], mine[n]) for n in final),
            "max_diff": max(float((final[n] - mine[n]).abs().max()) for n in final),
            "python_random_equal": python_equal,
            "loaded_over_other_init": not all(torch.equal(final[n], other_init[n]) for n in final),
        }

    bad = out / "flipped"
    if rank == 0:
        shutil.copytree(out / "zero2-fp32", bad)
        _flip(bad / "weights.safetensors")
    torch.distributed.barrier()
    results["flipped_byte_error"] = _load_error(load_state, _engine(2, False, lora_seed=1), bad, rank, world)
    results["other_adapter_error"] = _load_error(load_state, _engine(2, False, lora_seed=1, r=8), out / "zero2-fp32", rank, world)
    (out / f"results-rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _engine(stage: int, bf16: bool, lora_seed: int, r: int = 4):
    """The tiny model under the DeepSpeed config `lorag.train` builds (2 micro-steps per step)."""
    import deepspeed
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorag.sections import TrainConfig
    from lorag.worker import deepspeed_config

    torch.manual_seed(0)  # the frozen base is the same in every engine
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    )
    torch.manual_seed(lora_seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    # lora_B starts at zero; make it differ per seed too, so a missed load shows up in every weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))  # warm-up: the LR changes each step
    t = TrainConfig(zero_stage=stage, batch_size=2, gradient_accumulation_steps=2, precision="fp32")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(t, bf16, {}))
    engine.train()
    return engine


def _step(engine, step: int, rank: int) -> float:
    """One optimizer step (2 micro-steps) on data fixed by (step, rank), not by the global RNG. Returns the mean loss."""
    import torch

    losses = []
    for micro in range(engine.gradient_accumulation_steps()):
        g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
        ids = torch.randint(0, 96, (2, 12), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def _full_weights(engine) -> dict:
    """Trainable weights: the fp32 masters under ZeRO, the model's own tensors at stage 0 (equal only if the masters are)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
            out[name] = (p.detach() if full is None else full).clone()
    return out


def _load_error(load_state, engine, directory, rank, world) -> str | None:
    try:
        load_state(engine, directory, rank, world)
    except ValueError as e:
        return str(e)
    return None


# -- files -----------------------------------------------------------------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(directory: Path, **changes) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.update(changes)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _safetensors_header(path: Path) -> dict:
    """A safetensors file's tensor table, parsed by hand (8-byte length, JSON header, raw data to the end)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    assert 8 + n + end == len(data), f"{path.name}: the tensors do not fill the file"
    return header


def _edit_state(directory: Path, change) -> None:
    """Change state.json with `change(state)` and re-record its sha256, as someone who can write the checkpoint could."""
    import hashlib

    state = json.loads((directory / "state.json").read_text())
    change(state)
    (directory / "state.json").write_text(json.dumps(state))
    files = json.loads((directory / "manifest.json").read_text())["files"]
    _edit_manifest(directory, files={**files, "state.json": hashlib.sha256((directory / "state.json").read_bytes()).hexdigest()})


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda s: s["engine"].update(module=None), "engine.module is not a field resume restores"),
        (lambda s: s["engine"].update(optimizer={"lr": 1}), "engine.optimizer is not a field resume restores"),
        (lambda s: s.update(loss_scale={"__class__": 1}), "loss_scale.__class__ is not a field resume restores"),
        (lambda s: s.update(hook="x"), "'hook' is not a field resume restores"),
        (lambda s: s["engine"].update(global_steps="7"), "engine.global_steps has the wrong type (str)"),
        (lambda s: s["engine"].pop("micro_steps"), "engine.micro_steps is missing"),
        (lambda s: s["optimizer"].update(lr="0.1"), "optimizer.lr has the wrong type (str)"),
        (lambda s: s.update(scheduler=[1]), "scheduler is not an object"),
    ],
)
def test_resume_applies_only_the_fields_it_saved(runs, tmp_path, change, expected):
    """state.json sets attributes of the engine on resume: a field lorag does not write (or one of
    another type) is refused, naming it, before anything is loaded, even with a matching sha256."""
    from lorag.checkpoint import verify

    out, _ = runs
    ckpt = shutil.copytree(out / "zero2-fp32", tmp_path / "ckpt")
    verify(ckpt, WORLD)
    _edit_state(ckpt, change)
    with pytest.raises(ValueError) as e:
        verify(ckpt, WORLD)
    assert "state.json: " in str(e.value) and expected in str(e.value), str(e.value)


def test_scheduler_state_loads_only_the_live_schedulers_keys(tmp_path):
    """LambdaLR's load_state_dict sets every key it gets as an attribute: only keys of the live
    scheduler's own state, of the same kind, are passed on."""
    import torch

    from lorag.checkpoint import _scheduler_state

    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1), lambda s: 1.0)
    saved = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    assert _scheduler_state(tmp_path, saved, scheduler) == saved
    assert _scheduler_state(tmp_path, None, scheduler) is None and _scheduler_state(tmp_path, saved, None) is None
    with pytest.raises(ValueError, match=r"scheduler\.optimizer is not a field of this LR scheduler \(LambdaLR"):
        _scheduler_state(tmp_path, {**saved, "optimizer": {}}, scheduler)
    with pytest.raises(ValueError, match=r"scheduler\.last_epoch is a str, this LR scheduler's is a number"):
        _scheduler_state(tmp_path, {**saved, "last_epoch": "3"}, scheduler)
