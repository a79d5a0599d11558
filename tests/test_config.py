"""fdl.config: values, update, the override context, environment defaults, refusals."""

import threading

import pytest

import fdl
from fdl import config


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for opt in config.OPTIONS.values():
        monkeypatch.delenv(opt.env, raising=False)
    saved = dict(config._set)
    config._set.clear()
    yield
    config._set.clear()
    config._set.update(saved)


def test_defaults_and_values():
    assert fdl.config is config
    assert config.conv_backend == "auto" and config.rnn_backend == "auto"
    assert set(config.values()) == set(config.OPTIONS)
    assert config.native_cache.endswith("native")


def test_precedence_override_update_env(monkeypatch):
    monkeypatch.setenv("FDL_CONV_BACKEND", "XLA ")
    assert config.conv_backend == "xla"  # environment variable as the default, normalised
    config.update("conv_backend", "native")
    assert config.conv_backend == "native"
    with config.override(conv_backend="auto"):
        assert config.get("conv_backend") == "auto"
        with config.override(conv_backend="xla", rnn_backend="xla"):
            assert (config.conv_backend, config.rnn_backend) == ("xla", "xla")
        assert config.conv_backend == "auto"
    assert config.conv_backend == "native"
    config.conv_backend = "xla"  # attribute assignment is update()
    assert config.get("conv_backend") == "xla"


def test_override_is_local_to_the_thread():
    seen = []
    with config.override(rnn_backend="xla"):
        t = threading.Thread(target=lambda: seen.append(config.rnn_backend))
        t.start()
        t.join()
    assert seen == ["auto"]


def test_refusals(monkeypatch):
    with pytest.raises(ValueError, match=r"one of \['auto', 'native', 'xla'\], got 'onednn'"):
        config.update("conv_backend", "onednn")
    with pytest.raises(ValueError, match="native_build"):
        with config.override(native_build="sometimes"):
            pass
    with pytest.raises(AttributeError, match="no option 'conv_threads'.*conv_backend"):
        config.update("conv_threads", "2")
    with pytest.raises(AttributeError, match="no option"):
        config.conv_threads  # noqa: B018
    with pytest.raises(TypeError):
        config.update("rnn_backend", 1)
    monkeypatch.setenv("FDL_RNN_BACKEND", "onednn")
    with pytest.raises(ValueError, match="FDL_RNN_BACKEND"):
        config.get("rnn_backend")
    assert config._set == {}
