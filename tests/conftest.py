"""Shared test helpers: the smoke config with overrides."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
