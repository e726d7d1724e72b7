"""The sections of `lorag.yaml`: one pydantic model per part of the config tree under `LoragConfig`.

Knowledge bases (chunking, hybrid fusion), adapters (LoRA shape, RAFT, training), the endpoint
(autoscaling, API keys), the Ray cluster and Kubernetes each get a small model here; `lorag.config`
puts them together into `LoragConfig` and loads it. Each field is documented once, in its
`Field(description=...)`, which `lorag config` and docs/config.md show (`lorag.reference`). Every
section rejects unknown keys, and its validators name the field, the bad value and the fix.
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorag.storage import is_uri

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_NAME_RE = re.compile(NAME_PATTERN)


def validate_name(kind: str, name: str) -> str:
    """Check a knowledge-base or adapter name: lowercase, no path separators, never `..`.

    Raises:
        ValueError: naming the bad value and the allowed pattern.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid {kind} name {name!r}: use lowercase letters, digits, '.', '-' and '_' "
            f"(pattern {NAME_PATTERN}), starting with a letter or digit, and no '..'"
        )
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ChunkingConfig(_Strict):
    """How documents are split before embedding."""

    size: int = Field(200, ge=16, le=512, description="Chunk length in tokens of the embedder (keep it within the embedder's window: 256 for all-MiniLM-L6-v2). Larger chunks carry more context per hit but dilute the match.")
    overlap: int = Field(32, ge=0, description="Tokens shared by consecutive chunks, so a fact on a boundary is found whole.")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "ChunkingConfig":
        if self.overlap >= self.size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than size ({self.size})")
        return self


SearchMode = Literal["dense", "bm25", "hybrid"]  # the one definition of the search modes (config, CLI, API)


class HybridConfig(_Strict):
    """How hybrid search fuses its two rankings (by reciprocal rank, or by normalised scores). The defaults
    are the best of a sweep on a labelled benchmark's tuning corpus, held on three held-out documentation
    sets (docs/benchmarks.md, "Retrieval quality")."""

    dense_weight: float = Field(1.5, gt=0, le=10, description="Weight of the dense (meaning) ranking; full text weighs 1. Raise it for paraphrased questions, lower it for codes and names.")
    lexical_floor: float = Field(0.5, ge=0, le=1, description="Full-text hits scoring under this share of the best one are dropped before fusion (they match only common words).")
    rrf_k: int = Field(30, ge=1, le=1000, description="With fusion rrf: the RRF constant; higher flattens the weight of the top ranks.")
    fusion: Literal["rrf", "scores"] = Field(
        "rrf", description="rrf: weighted reciprocal rank fusion (ranks only); scores: each ranking's scores normalised to 0-1 "
        "and averaged by weight, so a chunk far ahead in full text (an exact code or name) stays ahead.",
    )


class KnowledgeBaseConfig(_Strict):
    """A knowledge base: documents chunked, embedded and stored in one Milvus collection."""

    name: str = Field(description="Knowledge-base name.")
    milvus_collection: str | None = Field(
        None, pattern=r"^[A-Za-z][A-Za-z0-9_]{0,254}$",
        description="Milvus collection name. Default: `kb_<name with '-' and '.' as '_'>_<8 hex of sha256(name)>`, distinct for every name "
        "(team-a, team.a and team_a get three). lorag writes only into collections it created for this knowledge base.",
    )
    sources: list[str] = Field(min_length=1, description="Files, directories or glob patterns of Markdown, text, HTML, PDF and JSONL documents, relative to this file.")
    text_field: str = Field("text", description="JSONL sources: the field holding each record's text (one record = one document).")
    title_field: str = Field("title", description="JSONL sources: the field holding each record's title (default: file name and line).")
    uri: str | None = Field(None, description="Milvus URI: a local file path for Milvus Lite (default `<workdir>/milvus.db`) or http://host:19530 for a server.")
    token: str | None = Field(None, description="Milvus server token ('user:password'); unused for Milvus Lite. Default: $LORAG_MILVUS_TOKEN of the process that opens the knowledge base (on a Ray cluster: set it in its nodes' environment), so that no file holds it; `lorag submit` refuses a token given with --set, `lorag k8s render` one written in the config. On Kubernetes every Ray pod gets LORAG_MILVUS_TOKEN=root:<milvus_root_password> from Secret lorag-secrets.")
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig, description="Chunk size and overlap.")
    top_k: int = Field(3, ge=1, le=50, description="Chunks retrieved per question. More gives the model more evidence and a longer prompt.")
    search: SearchMode = Field("hybrid", description="Retrieval mode: dense vectors (meaning), BM25 full text (exact words, codes, names), or hybrid (both, fused).")
    hybrid: HybridConfig = Field(default_factory=HybridConfig, description="Fusion settings of hybrid search.")
    max_per_source: int | None = Field(
        1, ge=1, description="At most this many chunks of any one document ahead of other documents' chunks, so near-duplicate chunks "
        "of one page cannot fill every slot; a document's further chunks follow, so a one-document knowledge base still gets top_k. "
        "null: no cap and no document ranking, chunks by score alone.",
    )
    source_weight: float = Field(
        0.1, ge=0, le=10, description="Documents are ranked by their best chunk's score plus this times the scores of their next two "
        "matching chunks, so a page that several chunks match ranks above one with a single lucky chunk (0: best chunk only). "
        "Needs max_per_source.",
    )
    embed_batch_size: int = Field(64, ge=1, description="Chunks per embedding batch in the ingest pipeline.")
    embed_actors: int | None = Field(
        None, ge=1, description="Embedding actors in the Ray Data pool (None: one per CPU Ray has free beside the chunker, up to 8; "
        "with GPUs, one per GPU free). An ingest starts at most as many as fit at one CPU (GPU) each, and at least one.",
    )
    stall_timeout_s: float = Field(
        300.0, gt=0, description="An ingest whose pipeline moves no batch for this long fails with an error naming the stalled stage "
        "(e.g. no CPU or GPU free for the embedder) instead of waiting forever. Raise it for very slow documents or a cluster that scales up slowly.",
    )
    max_source_bytes: int = Field(
        50_000_000, ge=1, description="A source document larger than this many bytes is not read: the ingest reports it as failed "
        "(its chunks from earlier ingests stay) and indexes the rest. Bounds the memory and time one document can take.",
    )
    embed_threads: int | None = Field(
        None, ge=1,
        description="CPU embedding: torch threads per embedding actor. Default: the CPUs the actor reserves, rounded up "
        "(1 with one actor per CPU, which measured faster than fewer actors with more threads each).",
    )

    _check_name = field_validator("name")(lambda v: validate_name("knowledge base", v))

    @property
    def collection(self) -> str:
        """The Milvus collection: `milvus_collection`, else derived from the name (the hash keeps names that map to one string apart)."""
        if self.milvus_collection:
            return self.milvus_collection
        return f"kb_{re.sub(r'[^a-z0-9_]', '_', self.name)}_{hashlib.sha256(self.name.encode()).hexdigest()[:8]}"


class LoraConfig(_Strict):
    """Low-rank adapter shape (peft `LoraConfig`)."""

    r: int = Field(8, ge=1, le=512, description="Rank of the update. Higher learns more and costs more memory and time.")
    alpha: int = Field(16, ge=1, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input during training.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names to adapt, or 'all-linear' for every linear layer but the output head.",
    )
    use_dora: bool = Field(False, description="DoRA (weight-decomposed LoRA): often better quality at the same rank, ~1.5x slower steps. Served like LoRA (batched, mixed with other adapters), at one extra elementwise op per adapted layer in batches that use it.")


class RaftConfig(_Strict):
    """RAFT-style training (Zhang et al. 2024) for an adapter bound to a knowledge base: each prompt
    holds the question's oracle passage among distractor passages of the same knowledge base, and
    the oracle is left out of some examples, so the adapter learns to find (and cite) the passage
    that answers, and to ignore the rest."""

    distractors: int = Field(3, ge=1, le=16, description="Distractor passages per prompt: the question's next-best chunks from other documents of the knowledge base (hard negatives).")
    oracle_fraction: float = Field(0.8, ge=0.0, le=1.0, description="Share of examples whose prompt holds the oracle (the retrieved chunk that holds the example's answer, else the question's top chunk); the rest get one more distractor in its place. RAFT's P.")
    cite: bool = Field(True, description="Cite the oracle as [n] in each answer whose prompt holds it and which it supports, right after the sentence it supports.")


class TrainConfig(_Strict):
    """Ray Train + DeepSpeed settings for one adapter."""

    max_steps: int = Field(30, ge=1, description="Optimizer steps. The run stops here even mid-epoch.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (linear warm-up over the first 10% of steps, then constant).")
    batch_size: int = Field(2, ge=1, description="Examples per worker per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step; multiplies the effective batch without more memory.")
    max_seq_len: int = Field(256, ge=16, description="Tokens per example; longer examples lose the start of their prompt (and are counted).")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.9, description="Share of the dataset held out for validation loss (0 disables validation).")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 0 replicates everything, 1 shards optimizer state, 2 also gradients, 3 also parameters.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO >= 1): less accelerator memory, slower steps.")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3 only).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Training precision. auto: bf16 on GPUs that support it, else fp32.")
    deepspeed_config: str | None = Field(None, description="A DeepSpeed JSON file merged over the generated config (its keys win), relative to this file.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker. Off trains on CPU.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes (Ray placement group strategy): PACK fills a node first; STRICT_SPREAD puts each worker on its own node.",
    )
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0: only at the end). A restarted run resumes from the latest.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept per run, best validation loss first (the latest is always kept for resuming).")
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from (restarting from the latest checkpoint) before giving up.")
    storage_path: str | None = Field(None, description="Where Ray Train writes checkpoints: a local dir or a pyarrow filesystem URI (s3://, gs://). Default: <workdir>/ray_results.")
    with_retrieval: bool = Field(True, description="For an adapter bound to a knowledge base: put its top-k passages into each training prompt, exactly as serving does, so the adapter learns to answer from sources. Needs the knowledge base ingested first.")
    raft: RaftConfig | None = Field(None, description="For an adapter bound to a knowledge base: train RAFT-style (oracle passage among distractors, oracle left out of some examples) instead of on the top-k passages. `lorag eval` compares it with plain LoRA + RAG.")
    resume: bool = Field(True, description="Continue an interrupted run of this adapter with the same data and settings (e.g. after the job or driver was killed) from its latest checkpoint. Off starts over.")
    seed: int = Field(0, description="Seed for adapter init, the validation split and data order; the same seed repeats the run.")
    log_every: int = Field(1, ge=1, description="Print a progress line every N steps.")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "TrainConfig":
        problems = []
        if self.offload_optimizer and self.zero_stage == 0:
            problems.append("offload_optimizer needs zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            problems.append("offload_params needs zero_stage: 3")
        if self.precision in ("bf16", "fp16") and not self.use_gpu:
            problems.append(f"precision {self.precision} needs use_gpu: true (CPU training runs in fp32; use precision: auto)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# `lorag eval`'s quality metrics (lorag.evaluation.METRICS without the costs), higher is better in each.
ReleaseMetric = Literal["exact_match", "f1", "contains", "choice_accuracy", "citation_accuracy", "retrieval_recall", "style_adherence"]


class CanaryConfig(_Strict):
    """A share of an adapter's traffic for one version under trial (`lorag.releases`)."""

    tag: str | None = Field(None, description="The tag whose version gets the share, read from the adapter store at every refresh: "
                            "`lorag adapters tag NAME@vN canary` starts (or moves) a canary with no redeploy, `lorag adapters untag NAME canary` ends it.")
    version: int | None = Field(None, ge=1, description="Or a fixed version number (changing it means redeploying).")
    weight: float = Field(0.1, ge=0, le=1, description="The share of `model: NAME` requests the canary answers, sticky per API key (or per "
                          "the request's `user` field when it has one): a client stays on one side.")

    @model_validator(mode="after")
    def _one(self) -> "CanaryConfig":
        if (self.tag is None) == (self.version is None):
            raise ValueError("a canary names exactly one of tag or version")
        return self


class AdapterConfig(_Strict):
    """A LoRA adapter: trained from a dataset, optionally bound to a knowledge base."""

    name: str = Field(description="Adapter name; the `model` clients ask for. Saved under `<adapter_store>/<name>/v<N>/`.")
    dataset: str = Field(description="JSONL file of {\"prompt\", \"completion\"} or {\"messages\": [...]} records, relative to this file.")
    knowledge_base: str | None = Field(None, description="Knowledge base to retrieve from when serving this adapter; omit for no retrieval.")
    system_prompt: str | None = Field(None, description="System message used in training and serving; omit for the base model's default.")
    answer_style: str | None = Field(None, description="A regular expression the adapter's answers match when they keep its house style (Python `re.search`), e.g. '^Tidewell Support:'. `lorag eval` reports how often each variant's answers do.")
    description: str | None = Field(None, description="What the adapter is for, in a sentence a user's question would resemble. `model: \"auto\"` routes by it and by the adapter's training questions.")
    method: Literal["lora", "full"] = Field("lora", description="lora trains a small adapter on the frozen base; full updates every weight (the baseline benchmarks compare against; not servable as an adapter).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter shape.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training job settings.")
    canary: CanaryConfig | None = Field(None, description="Send a share of `model: NAME` requests to another version than `stable`'s (see CanaryConfig).")
    release_metrics: list[ReleaseMetric] = Field(["f1"], min_length=1, description="What `lorag adapters promote` compares (metrics of `lorag eval`, e.g. f1, "
                                       "citation_accuracy, exact_match, contains, choice_accuracy, style_adherence): a version is promoted only "
                                       "if none is worse beyond noise (paired bootstrap, 95%) than the version the tag holds.")

    _check_name = field_validator("name")(lambda v: validate_name("adapter", v))

    @model_validator(mode="after")
    def _check(self) -> "AdapterConfig":
        if self.name == "auto":
            raise ValueError("adapter name 'auto' is reserved: `model: \"auto\"` asks the endpoint to pick an adapter")
        if self.answer_style is not None:
            try:
                re.compile(self.answer_style)
            except re.error as e:
                raise ValueError(f"adapter {self.name!r}: answer_style is not a regular expression: {e}") from None
        if self.train.raft and not self.knowledge_base:
            raise ValueError(f"adapter {self.name!r}: train.raft needs a knowledge_base to draw oracle and distractor passages from")
        return self


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling of the generator replicas (`autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle (0 scales to zero; the first request then waits for a cold start).")
    max_replicas: int = Field(2, ge=1, description="Upper bound under load.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests in flight per replica that the autoscaler aims for.")
    upscale_delay_s: float = Field(3.0, ge=0, description="How long load must stay high before adding replicas.")
    downscale_delay_s: float = Field(30.0, ge=0, description="How long load must stay low before removing replicas.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


class ApiKeyConfig(_Strict):
    """One API key with what it may use. The config holds the key's sha256, never the key."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex sha256 of the key: `printf %s \"$KEY\" | sha256sum`. Clients send the key itself.")
    name: str | None = Field(None, description="Who holds the key (for your records).")
    models: list[str] | None = Field(None, description="Adapter names (and the base model's name, and `auto` for routing among these) this key may use. Default: every model.")
    knowledge_bases: list[str] | None = Field(None, description="Knowledge bases this key may retrieve from. Default: every one.")


class ServeConfig(_Strict):
    """The HTTP endpoint (Ray Serve)."""

    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds. 0.0.0.0 exposes it beyond this machine.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    replicas: int = Field(1, ge=1, description="Generator replicas, each holding the base model and its adapters.")
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs reserved per generator replica.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs reserved per generator replica (Ray `num_gpus`; a fraction shares one). Above 0 the replica runs its model on the GPU Ray assigns it.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights and compute of the served model. auto: bfloat16 on a GPU that supports it, else float32.")
    max_replicas_per_node: int | None = Field(None, ge=1, description="At most this many generator replicas (and gateway replicas) on one node (1 spreads them over the cluster's nodes, so losing a node leaves the others serving). Default: no limit.")
    gateway_replicas: int | None = Field(
        None, ge=1, description="HTTP gateway replicas (validation, retrieval, routing; no CPU reserved). Default: as many as the generator's `replicas` "
        "(with autoscaling: its min_replicas, at least 1), so with max_replicas_per_node 1 every node that serves keeps a gateway of its own.",
    )
    max_adapters_per_replica: int = Field(4, ge=1, description="Adapters a replica keeps loaded (least recently used is evicted); Serve routes each adapter to replicas holding it.")
    max_lora_rank: int = Field(64, ge=1, le=512, description="Largest adapter rank a replica can serve (its adapter slots are sized for it).")
    max_batch_size: int = Field(8, ge=1, le=256, description="Requests one forward pass serves together, whatever their adapters (batched LoRA).")
    batch_wait_ms: float = Field(
        20.0, ge=0,
        description="How long a replica's open batch waits for the next request before it runs (8x this at most from its first "
        "request). Raise it (e.g. 50) when bursts arrive spread out on a busy CPU machine; 0 runs each request as it comes.",
    )
    merge_single_adapter: bool = Field(
        True,
        description="A batch whose requests all use one adapter runs on merged weights (W + BA, kept in a second copy of the "
        "adapted layers, recomputed when the batch's adapter changes): base-model speed, at the memory of that copy.",
    )
    max_tokens: int = Field(128, ge=1, description="Default completion length when a request gives no max_tokens.")
    route_threshold: float = Field(0.25, ge=-1, le=1, description="`model: \"auto\"`: the least cosine similarity between a question and an adapter's profile (description, training questions) that routes to that adapter; below it the base model answers. Check it with `lorag eval --routing`.")
    max_tokens_limit: int = Field(2048, ge=1, description="The most max_tokens one request may ask for (400 above): a bound on how long one request holds its batch's slot.")
    autoscaling: AutoscalingConfig | None = Field(None, description="Scale generator replicas with load (replaces `replicas`).")
    max_ongoing_requests: int = Field(8, ge=1, description="Requests one generator replica works on at once (they share its batches).")
    max_queued_requests: int = Field(32, ge=0, description="Requests waiting for a generator replica; beyond this the endpoint answers 503 at once instead of queueing.")
    request_timeout_s: float = Field(120.0, gt=0, description="A request still running after this answers 408/504 (Serve's HTTP timeout).")
    registry_refresh_s: float = Field(5.0, gt=0, le=3600, description="How often replicas re-read the adapter store's tags and versions: a moved tag "
                                      "(promote, rollback, canary) reaches every replica within this, with no restart; weights of versions nothing points at leave the replicas' slots.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies are refused with 413.")
    max_choices: int = Field(8, ge=1, le=128, description="The most choices (`n`) one request may ask for (400 above); each is one row of a batch.")
    api_keys_env: str = Field("LORAG_API_KEYS", description="Environment variable with comma-separated API keys. If it or api_keys_file is set, every /v1 request needs `Authorization: Bearer <key>`.")
    api_keys_file: str | None = Field(None, description="File with one API key per line (relative to this file); combined with api_keys_env.")
    auth: Literal["api_keys", "none"] | None = Field(
        None,
        description="api_keys: every /v1 request needs a key (the endpoint refuses to start without one). none: no keys, even on a "
        "public host (say so explicitly). Default: keys when any are configured; a host other than loopback with none refuses to start.",
    )
    api_keys: list[ApiKeyConfig] = Field(
        default_factory=list,
        description="Keys scoped to some adapters and knowledge bases (by sha256; 403 outside their scope). Keys from api_keys_env and "
        "api_keys_file may use everything.",
    )
    allow_kb_override: bool = Field(
        False,
        description="Let a request name another knowledge base in its `kb` field (within its key's scope). Off: a request retrieves only "
        "from its adapter's own knowledge base, so no caller can read a knowledge base through another adapter.",
    )
    client_system_message: Literal["follow", "replace"] = Field(
        "follow",
        description="A request's own system message, for an adapter with a system_prompt. follow: the adapter's system prompt stays "
        "first and the client's follows it, in one system message. replace: the client's replaces the adapter's (a caller can then "
        "undo what the adapter was told and trained with).",
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> "ServeConfig":
        if self.max_tokens > self.max_tokens_limit:
            raise ValueError(f"max_tokens ({self.max_tokens}) is above max_tokens_limit ({self.max_tokens_limit}): lower it or raise the limit")
        return self


class ClusterConfig(_Strict):
    """A running Ray cluster: where `lorag submit`, `lorag jobs` and `lorag deploy` send work."""

    address: str | None = Field(None, description="The head's Ray Jobs / dashboard address, e.g. http://HOST:8265. Default: $RAY_ADDRESS (--address wins).")
    pip: list[str] = Field(default_factory=list, description="Extra pip packages for submitted jobs (runtime_env pip). The cluster's image or venv should already hold lorag's dependencies; this is for additions.")
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for submitted jobs, the deployed app and the rendered Ray pods (e.g. AWS_ENDPOINT_URL for an "
        "S3-compatible store). Their values travel in plain text (runtime_env, pod specs), so names that say KEY, SECRET, TOKEN, PASSWORD "
        "or CREDENTIAL are refused: put credentials in the nodes' environment, or on Kubernetes in the Secret of k8s.storage_secret.",
    )


class WorkerGroupConfig(_Strict):
    """One KubeRay worker group (a pod template scaled between min and max replicas)."""

    replicas: int = Field(1, ge=0, description="Pods started with the cluster.")
    min_replicas: int = Field(0, ge=0, description="Fewest pods the autoscaler keeps.")
    max_replicas: int = Field(4, ge=0, description="Most pods the autoscaler starts (0 leaves the group out of the rendered manifests).")
    cpu: str = Field("4", description="CPU request and limit per pod (Kubernetes quantity).")
    memory: str = Field("16Gi", description="Memory request and limit per pod.")
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu per pod (0: a CPU group).")

    @model_validator(mode="after")
    def _bounds(self) -> "WorkerGroupConfig":
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"need min_replicas <= replicas <= max_replicas, got {self.min_replicas}, {self.replicas}, {self.max_replicas}")
        return self


class K8sConfig(_Strict):
    """Kubernetes under KubeRay (`lorag k8s render`): the images, sizes and namespace of the rendered manifests."""

    namespace: str = Field("lorag", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", description="Namespace of every rendered object (a DNS label: lowercase letters, digits, '-').")
    image: str = Field("lorag:0.1.0", description="The lorag image (built from k8s/Dockerfile) for Ray heads, workers and jobs; its pods run as uid 1000, gid 100 (rayproject/ray's `ray` user), without privilege escalation or capabilities.")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field("IfNotPresent", description="Pull policy of the lorag image.")
    ray_version: str = Field("2.60.0", description="Ray version in the image (KubeRay `rayVersion`; token auth needs 2.52 or later). Keep it equal to the Ray of k8s/Dockerfile's base image.")
    head_cpu: str = Field("2", description="CPU of the Ray head pod (it runs no training or serving work).")
    head_memory: str = Field("8Gi", description="Memory of the Ray head pod.")
    cpu_workers: WorkerGroupConfig = Field(default_factory=WorkerGroupConfig, description="CPU worker group: ingest, the Serve gateway, CPU work.")
    gpu_workers: WorkerGroupConfig = Field(
        default_factory=lambda: WorkerGroupConfig(replicas=0, min_replicas=0, max_replicas=2, cpu="8", memory="48Gi", gpus=1),
        description="GPU worker group: training and generator replicas (scaled from zero by the autoscaler).",
    )
    milvus_image: str = Field("milvusdb/milvus:v2.5.4", description="Milvus standalone image (2.5 or later runs BM25 inside Milvus). It runs as uid 1000 in group 0, with authentication on: root's password comes from Secret lorag-secrets (milvus_root_password), and only the Ray pods may connect.")
    milvus_storage: str = Field("20Gi", description="Size of the Milvus data volume.")
    storage_class: str | None = Field(None, description="StorageClass of the Milvus volume (default: the cluster's).")
    milvus_cpu: str = Field("2", description="CPU request and limit of the Milvus pod.")
    milvus_memory: str = Field("8Gi", description="Memory request and limit of the Milvus pod.")
    storage: str | None = Field(
        None,
        description="Artifact storage in the cluster (adapter store, checkpoints) when the config's own `storage` is not a URI: "
        "a pyarrow filesystem URI every pod reaches (s3://bucket/prefix, gs://bucket/prefix). No default bucket: rendering "
        "fails until one of the two is a URI. `lorag k8s apply` refuses a value containing 'replace-me' (the quickstart's placeholder).",
    )
    storage_secret: str | None = Field(
        None,
        description="A Secret whose keys become environment variables of every Ray pod: storage credentials such as "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, and any other credential the jobs need (never cluster.env_vars, "
        "which are rendered in plain text). None: the nodes' own identity (IRSA, workload identity).",
    )
    eval_dataset: str | None = Field(
        None,
        description="The evaluation set (JSONL) of the RayJob lorag-eval (`python -m jobs.evaluate --dataset`): a path inside the "
        "project, relative to the project root (the directory `lorag k8s render` runs in, which k8s/Dockerfile copies into the "
        "image), as `lorag submit eval --dataset` takes it. None: no eval RayJob is rendered.",
    )
    job_deadline_s: int = Field(6 * 3600, ge=60, description="RayJob activeDeadlineSeconds: a job still running after this is stopped.")
    job_ttl_s: int = Field(
        24 * 3600,
        ge=60,
        description="A finished RayJob (succeeded or failed) deletes itself after this many seconds; until then `lorag k8s status` "
        "shows it and `kubectl logs job/<name>` its logs. At least 60, so `lorag k8s apply` sees how a job it waits for ended.",
    )

    @field_validator("storage")
    @classmethod
    def _storage_is_uri(cls, v: str | None) -> str | None:
        if v is not None and not is_uri(v):
            raise ValueError(f"must be a URI that every pod reaches, such as s3://bucket/prefix or gs://bucket/prefix (got {v!r})")
        return v

    @field_validator("ray_version")
    @classmethod
    def _ray_supports_token_auth(cls, v: str) -> str:
        parts = v.split(".")
        if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]) or tuple(map(int, parts[:2])) < (2, 52):
            raise ValueError(f"must be a Ray version of 2.52 or later, as in the image's tag (KubeRay's token auth needs it), got {v!r}")
        return v
