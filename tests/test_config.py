"""Configuration: defaults under AMK_HOME, overrides, empty means unset, read at call time."""

from pathlib import Path

from amk_farm import config


def test_defaults_live_under_amk_home(tmp_path):
    cfg = config.load({"AMK_HOME": str(tmp_path)})
    assert cfg.home == tmp_path
    assert cfg.db_url == f"sqlite:///{tmp_path}/registry.db"
    assert cfg.store_url == f"{tmp_path}/store"
    assert cfg.signing_key == tmp_path / "keys" / "signing.key"
    assert cfg.s3_endpoint_url is None and cfg.ray_address is None


def test_overrides_and_empty_values():
    cfg = config.load(
        {
            "AMK_HOME": "~/x",
            "AMK_DB_URL": "postgresql+psycopg://127.0.0.1/test",
            "AMK_STORE_URL": "s3://bucket/prefix",
            "RAY_ADDRESS": "",
        }
    )
    assert cfg.home == Path("~/x").expanduser()
    assert cfg.db_url.startswith("postgresql")
    assert cfg.store_url == "s3://bucket/prefix"
    assert cfg.ray_address is None  # empty counts as unset


def test_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("AMK_HOME", str(tmp_path / "a"))
    assert config.load().home == tmp_path / "a"
    monkeypatch.setenv("AMK_HOME", str(tmp_path / "b"))
    assert config.load().home == tmp_path / "b"
    assert set(config.load().as_env()) == set(config.VARIABLES)
