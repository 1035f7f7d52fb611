"""``edgeloop models`` against a running cloud: register a user ONNX model, promote it (the
edge swaps it in), list, show, roll back; clear errors for a bad model and an unreachable API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from edgeloop.cli import cli as main
from tests.integration.delivery.kit import FEATURES, MODEL, Rig
from tests.waiting import wait_until


def sklearn_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(400, 2))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    clf = LogisticRegression().fit(x, y)
    path.write_bytes(to_onnx(clf, x[:1].astype(np.float32)).SerializeToString())
    return path


async def cli(*args: str) -> tuple[int, str]:
    # the API runs on this loop: the CLI's blocking client must run in a thread
    res = await asyncio.to_thread(CliRunner().invoke, main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


async def test_register_promote_list_show_rollback(tmp_path: Path, kafka_broker: str) -> None:
    async with Rig(tmp_path, kafka_broker) as rig:
        url = f"http://127.0.0.1:{rig.cloud.api_port}"
        await rig.promote_river(1)
        await wait_until(lambda: rig.active() == 1, 30, "v1 active")
        onnx_file = sklearn_model(tmp_path / "model.onnx")
        code, out = await cli(
            "models", "--url", url, "register", str(onnx_file), "--name", MODEL,
            "--features", ",".join(FEATURES), "--kind", "classifier",
        )  # fmt: skip
        assert code == 0, out
        assert "registered v2" in out and "p99" in out
        code, out = await cli("models", "--url", url, "promote", MODEL, "2")
        assert code == 0 and "v2 is champion" in out, out
        await wait_until(lambda: rig.active() == 2, 30, "the user model active on the edge")

        code, out = await cli("models", "--url", url, "list")
        assert code == 0 and MODEL in out and "v2" in out, out
        code, out = await cli("models", "--url", url, "show", MODEL)
        assert code == 0 and "v2" in out and "user" in out and "sha256" in out, out

        code, out = await cli("models", "--url", url, "rollback", MODEL)
        assert code == 0 and "rolled back to v1" in out, out
        await wait_until(lambda: rig.active() == 1, 20, "signed rollback to v1")

        # a model whose width does not match its feature list is refused with the reason
        code, out = await cli(
            "models", "--url", url, "register", str(onnx_file), "--name", MODEL,
            "--features", "a,b,c",
        )  # fmt: skip
        assert code == 1 and "HTTP 422" in out and "3" in out, out


async def test_unreachable_api_is_a_clear_error(tmp_path: Path) -> None:
    code, out = await cli("models", "--url", "http://127.0.0.1:9", "list")
    assert code == 1 and "cannot reach the cloud API at http://127.0.0.1:9" in out, out
