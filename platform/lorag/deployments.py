"""The Ray Serve deployments: thin wrappers around `Gateway` and `Engine`.

- `GatewayDeployment` (the HTTP ingress) builds a `Gateway` whose backend is `ServeBackend`, the
  Generator deployment's handle; its FastAPI app comes from `build_api` at replica start.
- `GeneratorDeployment` holds one `Engine`. Serve's multiplexing (`get_adapter`) is the routing
  hint only: it tells Serve which adapters to send to this replica, and prepares their files;
  the adapters' weights live in the engine's one cache (its model slots).

Over capacity (a generator's queue past `max_queued_requests`) a request is a 503 at once. A
generator whose model thread stops making progress while requests wait fails Serve's health check
(`check_health`) and is replaced.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.exceptions import BackPressureError

from lorag.adapters import parse_model_id
from lorag.auth import key_scopes
from lorag.config import LoragConfig
from lorag.engine import Completion, Engine, SamplingParams
from lorag.models import PromptEncoder
from lorag.gateway import Gateway, build_api
from lorag.releases import Registry
from lorag.schemas import APIError

log = logging.getLogger("lorag.deployments")
OVERLOADED = APIError(503, "the endpoint is over capacity; retry shortly", type="server_error", code="overloaded")


@serve.deployment
class GeneratorDeployment:
    """One `Engine` per replica; requests arrive with their adapter as the multiplexed model id."""

    def __init__(self, config: dict[str, Any], model_ref: str):
        cfg = LoragConfig.model_validate(config)
        self.engine = Engine(cfg, model_ref)
        self.engine.torch.submit(lambda: self.engine.grammars.warm())  # structured output's one-time start, before the first such request
        self.stop = threading.Event()
        threading.Thread(target=self._retire_loop, args=(Registry(self.engine.store, cfg),), daemon=True, name="lorag-retire").start()

        # Wrapped here, not with a decorator, because the size comes from the config; Serve keeps
        # its LRU on the wrapped function object, so it must be a plain function, not a bound method.
        async def prepare(adapter_id: str) -> str:
            await self.engine.prepare_adapter(adapter_id)
            return adapter_id

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=cfg.serve.max_adapters_per_replica)(prepare)

    def _retire_loop(self, registry) -> None:
        """Every `serve.registry_refresh_s`: versions that no tag, newest or canary points at leave the slots."""
        while not self.stop.wait(registry.refresh_s):
            try:
                names = {parse_model_id(a)[0] for a in self.engine.cache.loaded()}
                keep = {f"{n}@v{v}" for n in names for v in registry.referenced(n)}
                self.engine.retire(lambda adapter: adapter in keep or parse_model_id(adapter)[0] not in names)
            except Exception as e:  # a store that is briefly unreachable: try again at the next refresh
                log.warning("retiring unreferenced adapter versions failed: %s", e)

    def check_health(self) -> None:
        """Serve's periodic replica check: fails while requests wait on a model thread that has
        stopped making progress (`Engine.check_progress`), so Serve replaces this replica."""
        self.engine.check_progress()

    async def _adapter(self) -> str | None:
        adapter = serve.get_multiplexed_model_id() or None
        if adapter:
            await self.get_adapter(adapter)
        return adapter

    async def generate(self, prompt, params: SamplingParams) -> Completion:
        return await self.engine.generate(prompt, params, await self._adapter())

    async def stream(self, prompt, params: SamplingParams) -> AsyncIterator[str | Completion]:
        async for item in self.engine.stream(prompt, params, await self._adapter()):
            yield item


class ServeBackend:
    """The Gateway's backend under Serve: calls into the Generator deployment, routed by adapter."""

    def __init__(self, handle):
        self.handle = handle

    def _for(self, adapter: str | None):
        return self.handle.options(multiplexed_model_id=adapter) if adapter else self.handle

    async def generate(self, prompt, params: SamplingParams, adapter: str | None) -> Completion:
        try:
            return await self._for(adapter).generate.remote(prompt, params)
        except BackPressureError:
            raise OVERLOADED from None
        except APIError as e:  # raised in the replica: Ray re-raises it as a subclass that carries the original
            raise getattr(e, "cause", e) from None

    async def stream(self, prompt, params: SamplingParams, adapter: str | None) -> AsyncIterator[str | Completion]:
        response = self._for(adapter).options(stream=True).stream.remote(prompt, params)
        try:
            async for item in response:
                yield item
        except BackPressureError:
            raise OVERLOADED from None
        except APIError as e:
            raise getattr(e, "cause", e) from None
        finally:
            response.cancel()  # no-op once finished; a client that left ends the replica's row


class ServeMetrics:
    """Per model version (`name@vN`, so a canary and stable show apart): requests by status, tokens and
    generation latency; and retrieval latency per knowledge base. In Ray's Prometheus metrics."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("lorag_requests", description="Completion requests per model.", tag_keys=("model", "status"))
        self.tokens = Counter("lorag_tokens", description="Prompt and completion tokens per model.", tag_keys=("model", "kind"))
        self.request_ms = Histogram("lorag_request_ms", description="Generation latency per model version (retrieval excluded).",
                                    boundaries=[50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000], tag_keys=("model",))
        self.retrieval_ms = Histogram("lorag_retrieval_ms", description="Knowledge-base search latency.", boundaries=[2, 5, 10, 20, 50, 100, 250, 1000], tag_keys=("kb",))

    def request(self, model: str, status: str, out: Completion | None, ms: float | None = None) -> None:
        self.requests.inc(tags={"model": model, "status": status})
        if ms is not None:
            self.request_ms.observe(ms, tags={"model": model})
        if out is not None:
            self.tokens.inc(out.prompt_tokens, tags={"model": model, "kind": "prompt"})
            self.tokens.inc(out.completion_tokens, tags={"model": model, "kind": "completion"})

    def retrieval(self, kb: str, ms: float) -> None:
        self.retrieval_ms.observe(ms, tags={"kb": kb})


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class GatewayDeployment:
    """The HTTP ingress: a `Gateway` in front of the Generator deployment."""

    def __init__(self, config: dict[str, Any], generator, model_ref: str, embedder_ref: str):
        from lorag.models import resolve_model

        cfg = LoragConfig.model_validate(config)
        key_scopes(cfg)  # first: a replica that must not serve without keys fails before loading anything
        prompts = PromptEncoder(resolve_model(model_ref, cfg.model_cache))
        self.gateway = Gateway(cfg, ServeBackend(generator), prompts, embedder_ref)
        self.gateway.metrics = ServeMetrics()

    def __serve_build_asgi_app__(self):
        return build_api(self.gateway)
