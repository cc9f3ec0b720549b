"""Runs v2 infer jobs on the engine, for HTTP and gRPC alike: model and version checks,
the shared gateway (validation off the event loop, queue bound), deadlines, metrics, and
the mapping of every failure to one ``V2Error``. Leaving a job early (client gone, call
cancelled, deadline) closes its streams, which aborts its requests and frees their blocks."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from engine.async_engine import EngineDeadError, QueueFullError, RequestFailedError
from engine.outputs import CompletionOutput, RequestOutput

from .. import protocol as P
from ..streams import merge
from .contract import InferJob, ResponseBuilder
from .errors import V2Error
from .tensors import Tensor

logger = logging.getLogger("kvserve.kserve")


@contextlib.contextmanager
def engine_errors():
    """Engine and gateway exceptions as V2Errors."""
    try:
        yield
    except V2Error:
        raise
    except P.APIError as e:
        raise V2Error.from_status(e.status, e.message, e.headers) from e
    except QueueFullError as e:
        raise V2Error("unavailable", f"server overloaded: {e}; retry later",
                      {"Retry-After": "1"}) from e
    except EngineDeadError as e:
        raise V2Error("unavailable", str(e)) from e
    except RequestFailedError as e:
        raise V2Error("internal", str(e)) from e
    except ValueError as e:
        raise V2Error.bad(str(e)) from e


class InferService:
    """v2 inference over the registry: a request's URL model (and version, if pinned) is
    routed like any other; the served version goes back in ``model_version``."""

    def __init__(self, registry, metrics, request_timeout: float | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.request_timeout = request_timeout

    @property
    def ready(self) -> bool:
        return self.registry.ready

    def check_model(self, name: str, version: str = ""):
        """The registry's Version a metadata call names (the pinned one, else the version
        that takes most traffic); V2Error not_found if none."""
        try:
            model, pinned = self.registry.lookup(name, version or None)
        except P.APIError as e:
            raise V2Error("not_found", f"Request for unknown model: '{name:.200}' is not "
                                       f"found") from e
        v = self.registry.shown_version(model, pinned)
        if v is None:
            raise V2Error("not_found", f"Request for unknown model: '{name:.200}' version "
                                       f"{(pinned or '')[:40]} is not found")
        return v

    def statistics(self, name: str = "", version: str = "") -> list[dict]:
        """Triton's statistics extension: every version of every model (no name), of one
        model, or one version; V2Error not_found for an unknown one."""
        if name:
            v = self.check_model(name, version)
            model = self.registry.models[v.model]
            keys = [v.version] if version else [k for k, o in model.versions.items()
                                                 if o.state not in ("UNLOADED", "FAILED")]
            names = [(model.name, k) for k in keys]
        else:
            names = [(m, k) for m, k, state, *_ in self.registry.rows()
                     if state not in ("UNLOADED", "FAILED")]
        return [self.metrics.version_stats(m, k).as_triton(m, k) for m, k in names]

    def deadline(self, job: InferJob) -> float | None:
        limits = [t for t in (self.request_timeout, job.timeout) if t]
        return min(limits) if limits else None

    async def _start(self, job: InferJob) -> list:
        with engine_errors():
            target = await self.registry.route(job.model, job.version or None, job.route_key)
            lora = target.lora
            if job.lora_name:
                chosen = await self.registry.route(job.lora_name, None, job.route_key)
                if chosen.gateway is not target.gateway:
                    raise V2Error.bad(f"lora_name {job.lora_name!r:.200} is not an adapter of "
                                      f"{target.reported}")
                target, lora = chosen, chosen.lora
            job.served = target
            # no await between routing and start_streams (see server/registry/registry.py)
            return await target.gateway.start_streams(P.new_id("v2"), job.prompts,
                                                      job.params, "text_input", lora)

    async def unary(self, job: InferJob, protocol: str) -> list[Tensor]:
        """Run to the end; the one response's tensors."""
        final = None
        async for tensors, last in self.responses(job, protocol):
            if last:
                final = tensors
        return final

    async def responses(self, job: InferJob, protocol: str
                        ) -> AsyncIterator[tuple[list[Tensor], bool]]:
        """(tensors, is_last) per response: every change when the job streams, else one at
        the end. Raises V2Error; a consumer that stops early aborts the job."""
        streams = await self._start(job)
        served = job.served
        timer = self.metrics.timer(protocol, None if served.lora is None else served.lora.lora_name,
                                   (served.model, served.version))
        tokenizer = served.gateway.tokenizer
        builder = ResponseBuilder(job, lambda t: tokenizer.decode([t]))
        latest: list = [_nothing_yet(job.params.n)] * len(streams)
        finished = [False] * len(streams)
        outcome = "aborted"
        try:
            with engine_errors():
                async with asyncio.timeout(self.deadline(job)):
                    async for i, out in merge(streams):
                        new = len(out.outputs[0].token_ids) if out.outputs else 0
                        timer.on_output(out, new - _tokens(latest[i]))
                        latest[i], finished[i] = out, out.finished
                        if job.stream or all(finished):
                            yield builder.tensors(latest), all(finished)
            outcome = "ok"
            timer.finish("ok", sum(len(o.prompt_token_ids) for o in latest),
                         sum(len(c.token_ids) for o in latest for c in o.outputs))
        except TimeoutError as e:
            outcome = "timeout"
            raise V2Error("deadline", "request exceeded its deadline and was aborted") from e
        except V2Error:
            outcome = "error"
            raise
        finally:
            for s in streams:
                s.close()
            if outcome != "ok":
                timer.fail(outcome)


def _nothing_yet(n: int) -> RequestOutput:
    """A prompt that has produced nothing yet, as a streamed batch's placeholder row."""
    return RequestOutput("", "", [], [CompletionOutput(i, "", []) for i in range(n)])


def _tokens(out: RequestOutput) -> int:
    return len(out.outputs[0].token_ids) if out.outputs else 0
