"""Shared test helpers: configs with overrides, a tiny SD3.5-style transformer config, random LoRA
adapters, XLA's FLOP count."""

import importlib.util
import json
import os
import pathlib
import sys

# The tests' programs are tiny: their compile time is most of their run time and no part of what
# they check. LLVM's optimisation of the CPU code is left out, and XLA's CPU fusion emitters, which
# took 40% of a smoke train step's compile (4.0 -> 2.1 s; tests/test_train.py, test_grad_accumulation.py
# and test_learned_routing.py 174 -> 118 s on 2 cores). Set before JAX starts; subprocesses inherit it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), TEST_XLA_FLAGS]))

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


# The files that take minutes, longest first (measured in CI, 2 workers: test_experiments ~8 min with
# the quick reproduction, the two-process runs ~5, the sharded steps ~3). Scheduled first, they leave the many short files to
# fill the gaps, so that with ``--dist loadfile`` the workers finish together (longest first).
LONG_FILES = ("test_experiments.py", "test_multiprocess.py", "test_sharding.py")


def pytest_collection_modifyitems(items):
    """Run ``LONG_FILES`` first, in that order; every other test keeps its place."""
    rank = {name: index for index, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


def load_benchmark(name: str):
    """``benchmarks/NAME.py`` as a module (``benchmarks/`` is not a package); its folder is on
    ``sys.path`` while it loads, for the scripts that import ``measure`` beside them."""
    folder = str(ROOT / "benchmarks")
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def cpu_devices_env(devices: int) -> dict[str, str]:
    """The environment of a subprocess with ``devices`` forced CPU devices (and the tests' XLA flags)
    that imports this checkout."""
    flags = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=path)


# ``python -m MODULE ARGS`` with Ctrl-C acting as in a terminal: a test runner started in the
# background ignores SIGINT and its children inherit that (a run keeps an ignored SIGINT ignored).
_RUN_WITH_CTRL_C = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                    "sys.argv[0] = {module!r}; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")  # fmt: skip


def module_command(module: str, *args: str, ctrl_c: bool = False) -> list[str]:
    """The command line of ``python -m MODULE ARGS``; with ``ctrl_c``, SIGINT raises
    ``KeyboardInterrupt`` in it as in a terminal."""
    return [sys.executable, *(("-c", _RUN_WITH_CTRL_C.format(module=module)) if ctrl_c else ("-m", module)), *args]


def main_command(*args: str, ctrl_c: bool = False) -> list[str]:
    """``module_command`` of ``danceopd_jax.main``."""
    return module_command("danceopd_jax.main", *args, ctrl_c=ctrl_c)


def load_config(name: str = "smoke", config_arg: str | None = None, **overrides):
    """``configs/NAME.py``'s ``get_config([config_arg])`` with dotted-key overrides (``{"optimizer.learning_rate": 0.1}``)."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config() if config_arg is None else module.get_config(config_arg)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


# A tiny SD3.5-style transformer (diffusers config names): MMDiT-X attn2 in the first and in the
# context_pre_only last block, RMS qk-norm; a 6 x 6-patch positional table.
SD35_TINY = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    pos_embed_max_size=6,
    dual_attention_layers=(0, 2),
    qk_norm="rms_norm",
)


def randomise_adapters(model, seed=1, std=0.3):
    """Non-zero B (and fresh A) on every LoRA adapter of ``model``, so LoRA changes the output."""
    import jax
    from flax import nnx

    from danceopd_jax.models.lora import lora_split

    _, adapters, _ = lora_split(model)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
    nnx.update(model, jax.tree.map(lambda a: std * jax.random.normal(next(keys), a.shape), adapters))


def jaxpr_equations(jaxpr, in_loop: bool = False):
    """``(equation, inside a loop body: while or scan)`` of a jaxpr and of every jaxpr nested in it
    (jit, remat, loops), recursively."""
    for eqn in jaxpr.eqns:
        yield eqn, in_loop
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from jaxpr_equations(getattr(inner, "jaxpr", inner), in_loop or eqn.primitive.name in ("while", "scan"))


def xla_flops(fn, *args):
    """XLA's FLOP count of the compiled ``fn`` (lowered-module estimate where unavailable)."""
    import jax

    lowered = jax.jit(fn).lower(*args)
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        cost = lowered.cost_analysis()
    return cost["flops"]


@pytest.fixture
def smoke_config():
    return load_config


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache per test process (and the commands it starts): tests that rebuild
    the same train step or sampler load its compiled program instead of compiling it again."""
    import os

    import jax

    cache = str(tmp_path_factory.mktemp("xla_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def diffusers_velocity(transformer, x, t, cond):
    """diffusers' ``SD3Transformer2DModel`` on our inputs: NHWC latents ``x``, sigmas ``t``
    (timestep ``1000 * t``), ``cond`` {"text", "pooled"} numpy arrays; the NHWC output as numpy."""
    import torch

    with torch.no_grad():
        out = transformer(
            hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2),
            encoder_hidden_states=torch.from_numpy(cond["text"]),
            pooled_projections=torch.from_numpy(cond["pooled"]),
            timestep=torch.from_numpy(1000 * t),
        ).sample
    return out.permute(0, 2, 3, 1).numpy()


def finished_stage(workdir, config, name: str, saved=None, step=None) -> str:
    """``WORKDIR/NAME`` as a finished stage leaves it, without training: its config.json (``saved``, a
    dict, or the resolved stage config as ``train`` records it) and a checkpoint at ``num_train_steps``."""
    import numpy as np

    from danceopd_jax import checkpoints, pipeline
    from danceopd_jax.config_validation import validate

    stage_dir = os.path.join(workdir, name)
    stage = pipeline.resolve_stage(config.stages[name], str(workdir))
    validate(stage)
    os.makedirs(stage_dir, exist_ok=True)
    if saved is None:
        checkpoints.save_run_config(stage, stage_dir)
    else:
        with open(os.path.join(stage_dir, checkpoints.CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(saved, f)
    manager = checkpoints.make_manager(stage_dir, 1)
    checkpoints.save(manager, step or stage.num_train_steps, {"w": np.zeros(2, np.float32)}, {})
    manager.wait_until_finished()
    manager.close()
    return stage_dir
