"""Interrupted generations (issue 12): after any interrupt, the next call is right.

    python benchmarks/fuzz_interrupts.py [--steps 8]

A scenario interrupts one cached generation of a shipped model (DiT or PixArt) and then calls the
pipeline again with the same seed; the second call must give exactly the image of an uninterrupted
cached call, and disabling the cache must then give exactly the stock image. Interrupts:

* ``block``: an exception raised inside the transformer (a forward pre-hook on a block) at step k;
* ``keyboard``: a KeyboardInterrupt raised there instead (Ctrl-C in a script);
* ``scheduler``: an exception from ``scheduler.step`` after the transformer's call at step k;
* ``callback``: an exception from the pipeline's step callback at step k (pipelines that have one);
* ``thread``: the interrupted call runs in another thread while this thread's generation goes on (each
  thread with its own scheduler, through ``from_pipe``, as diffusers advises for servers).

Every method (DuCa, ToCa, FORA, forecasting DuCa) is interrupted at every step k, in the first and the
last block. Counts: correct (the next call and the disabled call are exact) or wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import sys
import threading
from collections import Counter

import torch

from dualcache_diffusers import disable_dual_cache, enable_dual_cache
from dualcache_diffusers.bench import is_class_conditional, load_pipeline, text_call_kwargs

METHODS = {"duca": dict(config="duca"), "toca": dict(config="toca"), "fora": dict(config="fora"),
           "duca-forecast2": dict(config="duca", forecast_order=2)}
INTERRUPTS = ("block", "keyboard", "scheduler", "callback", "thread")


class Interrupted(Exception):
    pass


def call_inputs(pipe) -> dict:
    if is_class_conditional(pipe):
        return dict(class_labels=[3])
    return dict(prompt=["a thick seven"], **text_call_kwargs(pipe))


def generate(pipe, steps: int, **extra) -> torch.Tensor:
    return pipe(**call_inputs(pipe), num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="pt", **extra).images


@contextlib.contextmanager
def raise_in_block(pipe, block: int, at_call: int, error: type[BaseException], thread=None):
    calls = itertools.count()

    def hook(module, args, kwargs=None):
        if thread is not None and threading.current_thread() is not thread:
            return
        if next(calls) == at_call:
            raise error("interrupted in a block")

    blocks = pipe.transformer.transformer_blocks
    handle = blocks[block].register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def raise_in_scheduler(pipe, at_step: int):
    scheduler = pipe.scheduler
    step = scheduler.step
    calls = itertools.count()

    def failing(*args, **kwargs):
        if next(calls) == at_step:
            raise Interrupted("interrupted in scheduler.step")
        return step(*args, **kwargs)

    scheduler.step = failing
    try:
        yield
    finally:
        del scheduler.step  # the bound class method again


def interrupted_call(pipe, kind: str, step: int, block: int, steps: int) -> torch.Tensor | None:
    """One generation that is cut off at ``step`` (the exception is swallowed, as a server would). For
    ``thread``, returns the image of the generation this thread ran meanwhile."""
    try:
        if kind in ("block", "keyboard"):  # one transformer call per step on these pipelines (CFG batched)
            error = Interrupted if kind == "block" else KeyboardInterrupt
            with raise_in_block(pipe, block, step, error):
                generate(pipe, steps)
        elif kind == "scheduler":
            with raise_in_scheduler(pipe, step):
                generate(pipe, steps)
        elif kind == "callback":
            def callback(i, t, latents):
                if i == step:
                    raise Interrupted("interrupted in the step callback")
            generate(pipe, steps, callback=callback, callback_steps=1)
        elif kind == "thread":
            return interrupted_in_other_thread(pipe, step, block, steps)
    except (Interrupted, KeyboardInterrupt):
        return
    raise AssertionError(f"the {kind} interrupt at step {step} never fired")


def own_scheduler(pipe):
    """diffusers' pattern for serving threads: per request, the pipeline with a scheduler of its own (the
    multistep schedulers keep state between steps) and a tokenizer of its own (a fast tokenizer changes its
    padding settings per call), sharing every model."""
    own = dict(scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config))
    if getattr(pipe, "vae", None) is not None:
        own["vae"] = pipe.vae  # the shipped PixArt's AutoencoderTiny is not the type hint from_pipe carries over
    if getattr(pipe, "tokenizer", None) is not None:
        own["tokenizer"] = copy.deepcopy(pipe.tokenizer)
    copy_ = type(pipe).from_pipe(pipe, **own)
    copy_.set_progress_bar_config(disable=True)
    return copy_


def interrupted_in_other_thread(pipe, step: int, block: int, steps: int) -> torch.Tensor:
    def cut_off():
        with contextlib.suppress(Interrupted):
            generate(own_scheduler(pipe), steps)

    worker = threading.Thread(target=cut_off)
    with raise_in_block(pipe, block, step, Interrupted, thread=worker):
        worker.start()
        image = generate(own_scheduler(pipe), steps)
        worker.join()
    return image


def applicable(pipe, kind: str) -> bool:
    import inspect

    return kind != "callback" or "callback" in inspect.signature(type(pipe).__call__).parameters


def fuzz_interrupts(models: list[str], steps: int, counts: Counter, examples: dict) -> None:
    for model in models:
        pipe = load_pipeline(model)
        stock = generate(pipe, steps)
        last_block = len(pipe.transformer.transformer_blocks) - 1
        for method, options in METHODS.items():
            enable_dual_cache(pipe, **options)
            expected = generate(pipe, steps)
            for kind, step, block in itertools.product(INTERRUPTS, range(steps), (0, last_block)):
                if not applicable(pipe, kind) or (kind in ("scheduler", "callback") and block):
                    continue
                meanwhile = interrupted_call(pipe, kind, step, block, steps)
                again = generate(pipe, steps)
                ok = torch.equal(again, expected) and (meanwhile is None or torch.equal(meanwhile, expected))
                counts["interrupts " + ("correct" if ok else "wrong")] += 1
                if not ok:
                    examples.setdefault("interrupts wrong", f"{model} {method} {kind} at step {step}, block {block}")
            disable_dual_cache(pipe)
            ok = torch.equal(generate(pipe, steps), stock)
            counts["interrupts " + ("correct" if ok else "wrong")] += 1
            if not ok:
                examples.setdefault("disabled wrong", f"{model} {method}: disabled output differs from stock")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per generation (default: 8)")
    parser.add_argument("--models", nargs="+", default=["dit", "pixart"], help="shipped models (default: dit pixart)")
    args = parser.parse_args()
    counts: Counter = Counter()
    examples: dict[str, str] = {}
    fuzz_interrupts(args.models, args.steps, counts, examples)
    total = counts["interrupts correct"] + counts["interrupts wrong"]
    print("| input | tried | correct | wrong |\n|---|---|---|---|")
    print(f"| interrupt scenarios | {total} | {counts['interrupts correct']} | {counts['interrupts wrong']} |")
    for key, text in examples.items():
        print(f"example ({key}): {text}")
    return 1 if counts["interrupts wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
