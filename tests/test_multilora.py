"""Batched multi-LoRA (lorag.multilora): rows of one batch use different adapters in one forward pass.

Run: `.venv/bin/python -m pytest -q tests/test_multilora.py` (CPU, a few seconds).

The reference is peft itself: each adapter alone through `PeftModel` must give the logits the
batched path gives, and a row inside a mixed batch must give what it gives alone. Adapters are
made with `init_lora_weights=False`, so B is non-zero and every adapter really changes the model.
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lorag.generation import generate_batch
from lorag.lora_weights import LoraWeights
from lorag.models import load_causal_lm
from lorag.multilora import MultiLoraModel, find_segments

# Different ranks, targets and scaling rules, so the comparisons with peft cover each.
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "c": dict(r=16, lora_alpha=4, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"], alpha_pattern={"down_proj": 32}),
    "d": dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
}


def make_adapter(base_path, out, seed=0, **lora):
    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(base_path), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # DoRA starts with m = ||W + BA||, where it equals LoRA: move m as training would
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A width-64 model's matmuls are too small to gain from threads; syncing them costs more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model, root / name, seed=i, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}


@pytest.fixture
def base(tiny_model):
    return load_causal_lm(tiny_model)


@pytest.fixture
def mm(tiny_model):
    return MultiLoraModel(load_causal_lm(tiny_model), max_adapters=4, max_rank=16)


def tokens(rows, length=7, seed=1):
    return torch.randint(3, 1000, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "indices, bounds, adapters",
    [
        ([], [0], []),
        ([3], [0, 1], [3]),
        ([0, 0, 0], [0, 3], [0]),
        ([1, 1, 0, 2, 2], [0, 2, 3, 5], [1, 0, 2]),
        ([1, 0, 1], [0, 1, 2, 3], [1, 0, 1]),  # unsorted rows: the same adapter can make several runs
        ([2, 1, 3, 4], [0, 1, 2, 3, 4], [2, 1, 3, 4]),
    ],
)
def test_find_segments(indices, bounds, adapters):
    assert find_segments(indices) == (bounds, adapters)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_each_adapter_matches_peft(name, adapters, tiny_model, mm):
    ids = tokens(2)
    reference = logits(PeftModel.from_pretrained(load_causal_lm(tiny_model), str(adapters[name])), ids)
    slot = mm.load(name, LoraWeights.load(adapters[name]))
    with mm.rows([slot, slot]):
        got = logits(mm.model, ids)
    assert not torch.allclose(reference, logits(load_causal_lm(tiny_model), ids), atol=1e-3), "the adapter should change the model"
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


# A prompt always runs one matmul pair per run of rows; a 1-token (decode) step takes `strategy`.
@pytest.mark.parametrize("length, strategy", [(7, "auto"), (1, "dense"), (1, "segments")], ids=["prefill", "decode-dense", "decode-segments"])
def test_mixed_batch_rows_equal_each_row_alone(length, strategy, adapters, base, mm):
    mm.strategy = strategy
    slot = {name: mm.load(name, path) for name, path in adapters.items()}
    rows = [slot["a"], slot["a"], 0, slot["b"], slot["d"], slot["c"], slot["a"]]  # a run of two rows, and "a" again later
    ids = tokens(len(rows), length)
    with mm.rows(rows):
        mixed = logits(mm.model, ids)
    plain = logits(base, ids)
    for i, s in enumerate(rows):
        with mm.rows([s]):
            alone = logits(mm.model, ids[i : i + 1])[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5, msg=f"row {i} (slot {s}) differs in the mixed batch")
    assert torch.equal(mixed[2], plain[2]), "a base row must get exactly the base model's output"
    assert torch.equal(logits(mm.model, ids), plain), "with no batch set the wrapped model must be the base model"


def test_decode_plan_follows_a_slot_reloaded_with_another_adapter(adapters, mm, tiny_model, tmp_path):
    """The dense plan packs the batch's adapters into one matrix per layer (without the slots' zero
    padding: ranks 4 and 8 in rank-16 slots); a slot given to another adapter of the same shape must
    not reuse that copy."""
    mm.strategy = "dense"
    a, b = mm.load("a", adapters["a"]), mm.load("b", adapters["b"])
    ids = tokens(2, 1)
    with mm.rows([a, b]):
        before = logits(mm.model, ids)
    mm.unload("b")
    b2 = make_adapter(tiny_model, tmp_path / "b2", seed=7, **ADAPTERS["b"])
    assert mm.load("b2", b2) == b, "b2 should take b's freed slot"
    with mm.rows([a, b]):
        after = logits(mm.model, ids)
    with mm.rows([b]):
        alone = logits(mm.model, ids[1:])[0]
    torch.testing.assert_close(after[1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before[1], after[1], atol=1e-3), "the row must now use b2, not b's packed copy"
    torch.testing.assert_close(after[0], before[0], atol=1e-5, rtol=1e-5)


def test_mixed_greedy_generation_equals_each_row_alone(adapters, mm, tiny_model):
    slot = {name: mm.load(name, path) for name, path in adapters.items()}
    rows = [slot["a"], 0, slot["b"], slot["c"], slot["a"]]
    prompts = [list(range(10, 10 + n)) for n in (5, 9, 3, 7, 12)]  # different lengths: left padding
    pad = 2
    batched = generate_batch(mm, prompts, rows, max_new_tokens=8, pad_id=pad, eos_ids=[pad])
    for i, (p, s) in enumerate(zip(prompts, rows)):
        alone = generate_batch(mm, [p], [s], max_new_tokens=8, pad_id=pad, eos_ids=[pad])[0]
        assert batched[i] == alone, f"row {i} (slot {s}) generated differently in the batch"
    # and the adapter rows follow peft's own generation
    peft_model = PeftModel.from_pretrained(load_causal_lm(tiny_model), str(adapters["b"]))
    with torch.no_grad():
        ref = peft_model.generate(input_ids=torch.tensor([prompts[2]]), max_new_tokens=8, do_sample=False, pad_token_id=pad, eos_token_id=pad)
    assert batched[2] == ref[0, len(prompts[2]) :].tolist()[: len(batched[2])]
    assert len({tuple(t) for t in batched}) > 1, "different adapters should generate different text"


def test_rows_whose_caller_is_gone_stop_and_the_others_are_unchanged(adapters, mm):
    slot = mm.load("a", adapters["a"])
    prompts, rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [slot, 0, slot]
    full = generate_batch(mm, prompts, rows, max_new_tokens=12, pad_id=2, eos_ids=[])
    steps = []

    def gone(i):  # the caller of row 1 leaves after the 3rd token
        steps.append(i)
        return i == 1 and steps.count(1) >= 3

    cut = generate_batch(mm, prompts, rows, max_new_tokens=12, pad_id=2, eos_ids=[], gone=gone)
    assert cut[0] == full[0] and cut[2] == full[2], "rows still wanted must be unaffected"
    assert cut[1][:3] == full[1][:3] and len(cut[1]) <= 4 < len(full[1]), "the gone row stops (then only pads, cut at the pad/eos)"
    everyone_gone = generate_batch(mm, prompts, rows, max_new_tokens=12, pad_id=2, eos_ids=[], gone=lambda i: True)
    assert all(len(r) == 1 for r in everyone_gone), "with every caller gone the call ends after one token"


def test_generation_stops_at_a_stop_token_and_sampling_follows_the_seed(adapters, mm):
    slot = mm.load("a", adapters["a"])
    prompts, rows = [[5, 6, 7], [8, 9]], [slot, 0]
    greedy = generate_batch(mm, prompts, rows, max_new_tokens=6, pad_id=2, eos_ids=[2])
    stop = greedy[1][2]
    cut = generate_batch(mm, prompts, rows, max_new_tokens=6, pad_id=2, eos_ids=[stop])
    assert cut[1] == greedy[1][: greedy[1].index(stop) + 1], "a row ends with its first stop token"
    sampled = [generate_batch(mm, prompts, rows, max_new_tokens=6, pad_id=2, eos_ids=[2], temperature=1.5, top_p=0.9, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1], "the same seed must give the same sample"
    assert sampled[0] != sampled[2] and sampled[0] != greedy, "temperature 1.5 should sample, not decode greedily"


def test_penalties_lower_the_logits_of_generated_tokens_by_count_and_presence():
    from lorag.generation import Penalties

    # columns 0-1 are the prompt (token 9 there is not penalised); then row 0 generated 1, 1, 3 and row 1 generated 2, 2, 2
    ids = torch.tensor([[9, 9, 1, 1, 3], [9, 9, 2, 2, 2]])
    got = Penalties(frequency=0.5, presence=1.0, start=2)(ids, torch.zeros(2, 10))
    want = torch.zeros(2, 10)
    want[0, 1], want[0, 3], want[1, 2] = -(2 * 0.5 + 1.0), -(0.5 + 1.0), -(3 * 0.5 + 1.0)
    assert torch.equal(got, want)
    assert torch.equal(Penalties(-1.0, 0.0, 2)(ids, torch.zeros(2, 10))[1, 2], torch.tensor(3.0)), "negative: repetition favoured"
    assert torch.equal(Penalties(0.5, 1.0, 5)(ids, torch.ones(2, 10)), torch.ones(2, 10)), "nothing generated yet: unchanged"


def test_a_frequency_penalty_breaks_greedy_repetition(mm):
    prompts, rows = [[5, 6, 7], [8, 9]], [0, 0]
    plain = generate_batch(mm, prompts, rows, max_new_tokens=24, pad_id=2, eos_ids=[])
    assert all(len(set(r)) < len(r) / 2 for r in plain), f"premise: the tiny model repeats itself greedily: {plain}"
    penalised = generate_batch(mm, prompts, rows, max_new_tokens=24, pad_id=2, eos_ids=[], frequency_penalty=2.0, presence_penalty=1.0)
    assert all(len(set(q)) > len(set(r)) for q, r in zip(penalised, plain)), (plain, penalised)
    assert penalised == generate_batch(mm, prompts, rows, max_new_tokens=24, pad_id=2, eos_ids=[], frequency_penalty=2.0, presence_penalty=1.0)


def test_unload_frees_the_slot_and_its_rows_get_the_base(adapters, base, mm):
    sa, sb = mm.load("a", adapters["a"]), mm.load("b", adapters["b"])
    ids = tokens(2)
    mm.set_batch([sa, sb])
    with_a = logits(mm.model, ids)
    assert mm.unload("a") == sa and mm.slots == {"b": sb}
    after = logits(mm.model, ids)
    assert not torch.allclose(with_a[0], after[0])
    assert torch.equal(after[0], logits(base, ids)[0]), "rows of an unloaded adapter must get exactly the base output"
    torch.testing.assert_close(after[1], with_a[1], atol=1e-6, rtol=1e-6)
    assert mm.load("c", adapters["c"]) == sa, "the freed slot is reused"
    mm.set_batch(None)


def test_reloading_a_name_replaces_its_weights_in_place(adapters, mm, tiny_model):
    slot = mm.load("x", adapters["c"])
    assert mm.load("x", adapters["a"]) == slot
    ids = tokens(1)
    reference = logits(PeftModel.from_pretrained(load_causal_lm(tiny_model), str(adapters["a"])), ids)
    with mm.rows([slot]):
        torch.testing.assert_close(logits(mm.model, ids), reference, atol=1e-5, rtol=1e-5)


def test_merged_single_adapter_follows_slot_changes_and_leaves_the_base_exact(adapters, base, mm, tiny_model):
    """A batch on one adapter runs on merged weights W + BA: recomputed when its slot changes, never written into W."""

    def peft_logits(name, ids):
        return logits(PeftModel.from_pretrained(load_causal_lm(tiny_model), str(adapters[name])), ids)

    ids = tokens(2)
    slot = mm.load("x", adapters["c"])
    with mm.rows([slot, slot]):
        torch.testing.assert_close(logits(mm.model, ids), peft_logits("c", ids), atol=1e-5, rtol=1e-5)
    assert any(layer.merged_slot == slot for layer in mm.layers.values()), "a single-adapter batch should run merged"
    assert mm.load("x", adapters["a"]) == slot  # same slot, other weights: the merged copy is stale
    with mm.rows([slot, slot]):
        torch.testing.assert_close(logits(mm.model, ids), peft_logits("a", ids), atol=1e-5, rtol=1e-5)
    mm.unload("x")
    assert mm.load("y", adapters["b"]) == slot
    with mm.rows([slot, slot]):
        merged = logits(mm.model, ids)
    torch.testing.assert_close(merged, peft_logits("b", ids), atol=1e-5, rtol=1e-5)
    mm.merge_single = False
    with mm.rows([slot, slot]):
        torch.testing.assert_close(logits(mm.model, ids), merged, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits(mm.model, ids), logits(base, ids)), "the base weights must stay exact"
    base_weights = dict(base.named_parameters())
    assert all(torch.equal(p, base_weights[n]) for n, p in mm.model.named_parameters())


def test_state_dict_keys_are_unchanged(tiny_model, base):
    wrapped = MultiLoraModel(load_causal_lm(tiny_model), max_adapters=2, max_rank=4)
    assert list(wrapped.model.state_dict()) == list(base.state_dict())
    assert len(wrapped.layers) == 2 * 7


# -- refusals ------------------------------------------------------------------------------------


def test_bin_only_adapter_is_refused(adapters, tmp_path):
    (tmp_path / "adapter_config.json").write_text((adapters["a"] / "adapter_config.json").read_text())
    (tmp_path / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="holds only adapter_model.bin: lorag loads adapters from safetensors only"):
        LoraWeights.load(tmp_path)


def test_dora_on_a_model_with_biases_matches_peft_alone_and_in_a_mixed_batch(tmp_path):
    """DoRA scales W x + BA x per output row before the bias; the tiny Llama has no biases, this one has."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, attention_bias=True, mlp_bias=True))
    with torch.no_grad():  # HF initialises biases to zero
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "biased")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    dora = make_adapter(tmp_path / "biased", tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=targets)
    lora = make_adapter(tmp_path / "biased", tmp_path / "lora", seed=1, r=4, lora_alpha=8, target_modules=targets)
    ids = tokens(3, 5)
    reference = logits(PeftModel.from_pretrained(load_causal_lm(tmp_path / "biased"), str(dora)), ids)
    for merge in (True, False):
        mm = MultiLoraModel(load_causal_lm(tmp_path / "biased"), max_adapters=2, max_rank=8, merge_single=merge)
        d, l = mm.load("dora", dora), mm.load("lora", lora)
        with mm.rows([d, d, d]):
            torch.testing.assert_close(logits(mm.model, ids), reference, atol=1e-5, rtol=1e-5, msg=f"merge_single={merge}")
        for length in (5, 1):  # prefill (runs) and decode (dense) plans
            with mm.rows([l, d, 0]):
                mixed = logits(mm.model, ids[:, :length])
            torch.testing.assert_close(mixed[1], reference[1, :length], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reference, logits(PeftModel.from_pretrained(load_causal_lm(tmp_path / "biased"), str(lora)), ids), atol=1e-3)


def test_adapter_for_another_base_is_refused_with_both_shapes(tmp_path, mm):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    small.save_pretrained(tmp_path / "small")
    make_adapter(tmp_path / "small", tmp_path / "adapter", r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: adapter shape \[32, 32\] \(out, in\) != base weight shape \[64, 64\]"):
        mm.load("other", tmp_path / "adapter")
    assert mm.slots == {}, "a refused adapter must not take a slot"


def test_rank_above_max_rank_and_unwrapped_modules_are_refused(adapters, tiny_model):
    small = MultiLoraModel(load_causal_lm(tiny_model), max_adapters=2, max_rank=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="rank 16 exceeds max_rank 8") as e:
        small.load("c", adapters["c"])
    assert "model.layers.1.mlp.down_proj: not a wrapped layer" in str(e.value), "every problem is listed"
    assert small.slots == {}


def test_full_slots_raise_until_one_is_unloaded(adapters, tiny_model):
    small = MultiLoraModel(load_causal_lm(tiny_model), max_adapters=2, max_rank=16)
    small.load("a", adapters["a"])
    small.load("b", adapters["b"])
    with pytest.raises(RuntimeError, match=r"all 2 adapter slots are in use \(\['a', 'b'\]\): unload one first"):
        small.load("c", adapters["c"])
    small.unload("a")
    assert small.load("c", adapters["c"]) == 1


def test_rows_must_use_loaded_slots(mm, adapters):
    mm.load("a", adapters["a"])
    with pytest.raises(ValueError, match=r"rows use slots \[3\], which hold no adapter"):
        mm.set_batch([1, 3])


def test_unexpected_tensors_are_refused(adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps(json.loads((adapters["a"] / "adapter_config.json").read_text())))
    weights = load_file(adapters["a"] / "adapter_model.safetensors")
    weights["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor 'base_model.model.lm_head.weight'"):
        LoraWeights.load(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_batch_on_a_gpu_in_bfloat16_follows_each_row_alone(adapters, tiny_model):
    mm = MultiLoraModel(load_causal_lm(tiny_model, "bfloat16").to("cuda"), max_adapters=4, max_rank=16)
    slot = {name: mm.load(name, path) for name, path in adapters.items()}
    rows = [slot["a"], 0, slot["b"], slot["d"], slot["c"]]
    prompts = [list(range(10, 10 + n)) for n in (5, 9, 3, 7, 12)]
    batched = generate_batch(mm, prompts, rows, max_new_tokens=6, pad_id=2, eos_ids=[2])
    alone = [generate_batch(mm, [p], [s], max_new_tokens=6, pad_id=2, eos_ids=[2])[0] for p, s in zip(prompts, rows)]
    assert sum(b == a for b, a in zip(batched, alone)) >= 4, "bf16 may flip a near tie, not most rows"
    ids = tokens(2, 5).cuda()
    with mm.rows([slot["b"], slot["b"]]):
        got = logits(mm.model, ids).float().cpu()
    reference = logits(PeftModel.from_pretrained(load_causal_lm(tiny_model), str(adapters["b"])), ids.cpu())
    torch.testing.assert_close(got, reference, atol=0.05, rtol=0.05)


# -- failures stay with their rows: sampling that cannot produce NaN, adapters that fail closed -------


def overflowing_adapter(base_path, out, scale=1e25):
    """A PEFT adapter whose weights are finite but so large that the model's activations overflow
    (as a diverged training run leaves them): its rows' scores turn NaN."""
    from safetensors.torch import load_file, save_file

    make_adapter(base_path, out, seed=5, r=4, target_modules=["q_proj", "v_proj"])
    weights = load_file(out / "adapter_model.safetensors")
    save_file({k: v * scale for k, v in weights.items()}, out / "adapter_model.safetensors")
    return out


@pytest.mark.parametrize("temperature", [1e-40, 1e-9, 0.005])
def test_temperatures_below_the_floor_decode_greedily(mm, temperature):
    """Dividing float32 logits by 1e-40 overflows to inf and softmax turns it into NaN, which made
    torch.multinomial raise for the whole batch; below MIN_TEMPERATURE a row decodes greedily."""
    prompts, rows = [[5, 6, 7], [8, 9]], [0, 0]
    greedy = generate_batch(mm, prompts, rows, max_new_tokens=6, pad_id=2, eos_ids=[2])
    assert generate_batch(mm, prompts, rows, max_new_tokens=6, pad_id=2, eos_ids=[2], temperature=temperature, seed=1) == greedy
    from lorag.schemas import MIN_TEMPERATURE

    assert temperature < MIN_TEMPERATURE
    sampled = generate_batch(mm, prompts, rows, max_new_tokens=6, pad_id=2, eos_ids=[2], temperature=MIN_TEMPERATURE, seed=1)
    assert [len(r) for r in sampled] == [6, 6], "at the floor itself the row samples, with finite scores"


@pytest.mark.parametrize("bad, field", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=-0.5), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"), (dict(temperature=1.0, top_p=float("nan")), "top_p"), (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty"), (dict(presence_penalty=float("nan")), "presence_penalty"),
])
def test_sampling_parameters_that_could_make_nan_are_refused_before_generating(mm, bad, field):
    with pytest.raises(ValueError, match=rf"{field}=.*must be a finite number"):
        generate_batch(mm, [[5, 6, 7]], [0], max_new_tokens=2, pad_id=2, eos_ids=[2], **bad)


def test_a_row_whose_scores_turn_nan_ends_alone_and_the_others_are_unchanged(adapters, mm, tiny_model, tmp_path):
    """An adapter that overflows the model gives NaN scores: greedy decoding used to pick garbage
    and sampling to raise for every row. Now that row is reported once and ends; the rows beside
    it (another adapter, the base model) generate exactly what they generate alone."""
    huge, a = mm.load("huge", overflowing_adapter(tiny_model, tmp_path / "huge")), mm.load("a", adapters["a"])
    prompts, rows = [[5, 6, 7], [5, 6, 7, 8], [8, 9]], [a, huge, 0]
    for sampling in ({}, {"temperature": 0.7, "seed": 3}):
        failed = []
        out = generate_batch(mm, prompts, rows, max_new_tokens=6, pad_id=2, eos_ids=[2], on_error=failed.append, **sampling)
        assert failed == [1], f"only the overflowing row fails ({sampling})"
        assert out[1] == [2], "it ends at once, on the stop token it was given"
        if not sampling:
            for i in (0, 2):
                assert out[i] == generate_batch(mm, [prompts[i]], [rows[i]], max_new_tokens=6, pad_id=2, eos_ids=[2])[0], f"row {i} unchanged"
        else:
            assert len(out[0]) == len(out[2]) == 6
    with pytest.raises(FloatingPointError, match=r"rows \[1\] got NaN or infinite scores"):
        generate_batch(mm, prompts, rows, max_new_tokens=3, pad_id=2, eos_ids=[2])


def _bad_adapter(kind, good, out):
    """A PEFT directory copied from `good` with one thing broken (as a bad disk, a bad tool, or a diverged run leaves it)."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    config = json.loads((good / "adapter_config.json").read_text())
    weights = load_file(good / "adapter_model.safetensors")
    key = sorted(k for k in weights if "lora_A" in k)[0]
    if kind == "corrupt":
        (out / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(range(40)))
    elif kind == "truncated":
        (out / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes()[:-100])
    elif kind == "1-D tensor":
        weights[key] = weights[key].flatten()
    elif kind == "rank 0":
        weights[key], weights[key.replace("lora_A", "lora_B")] = weights[key][:0], weights[key.replace("lora_A", "lora_B")][:, :0]
    elif kind == "NaN weights":
        weights[key][0, 0] = float("nan")
    elif kind == "integer weights":
        weights[key] = weights[key].to(torch.int32)
    elif kind == "config not an object":
        config = [config]
    elif kind == "alpha not a number":
        config["lora_alpha"] = "sixteen"
    elif kind == "alpha_pattern not an object":
        config["alpha_pattern"] = ["q_proj"]
    elif kind == "alpha overflows":
        config["lora_alpha"] = 1e308
    if not (out / "adapter_model.safetensors").exists():
        save_file(weights, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


BAD_ADAPTERS = [
    ("corrupt", "adapter_model.safetensors is not a readable safetensors file"),
    ("truncated", "adapter_model.safetensors is not a readable safetensors file"),
    ("1-D tensor", r"has shape \[\d+\], not a matrix"),
    ("rank 0", r"has shape \[(0, \d+|\d+, 0)\], not a matrix"),
    ("NaN weights", "is NaN or infinite in places"),
    ("integer weights", "is not floating point"),
    ("config not an object", "adapter_config.json must hold a JSON object"),
    ("alpha not a number", "lora_alpha='sixteen': not a finite number"),
    ("alpha_pattern not an object", r"alpha_pattern=\['q_proj'\]: not a JSON object"),
    ("alpha overflows", "overflows; lower lora_alpha"),
]


@pytest.mark.parametrize("kind, message", BAD_ADAPTERS, ids=[k for k, _ in BAD_ADAPTERS])
def test_malformed_adapter_files_are_a_value_error_naming_the_problem(adapters, mm, tmp_path, kind, message):
    """Every way an adapter's files can be broken is one ValueError that says what is wrong (never
    a SafetensorError, IndexError or AttributeError from deep inside), and takes no slot."""
    bad = _bad_adapter(kind, adapters["a"], tmp_path / "bad")
    with pytest.raises(ValueError, match=message):
        mm.load("bad", bad)
    assert mm.slots == {}


def test_a_load_that_fails_while_copying_leaves_the_slot_empty(adapters, mm):
    """A slot never holds half an adapter: a copy that fails midway (here a tensor with no data, as
    an out-of-memory error would) leaves the slot zero and free, and the next adapter takes it."""
    from lorag.lora_weights import LoraWeights

    good = LoraWeights.load(adapters["b"])
    names = sorted(good.modules)
    a, b = good.modules[names[-1]]
    half = LoraWeights(good.path, None, {**good.modules, names[-1]: (a.to("meta"), b)})
    with pytest.raises(NotImplementedError):
        mm.load("half", half)
    assert mm.slots == {}
    assert all(not layer.pairs and not layer.lora_A.any() and not layer.lora_B.any() for layer in mm.layers.values()), "no layer keeps part of it"
    assert mm.load("a", adapters["a"]) == 1
