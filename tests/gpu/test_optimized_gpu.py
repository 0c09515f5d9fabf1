"""The optimized path on a real GPU: device graphs captured, same function as stock (opt-in: -m gpu)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]


def test_sd_tiny_optimized_matches_stock_with_graphs(tmp_path, monkeypatch):
    monkeypatch.setenv("MI300X_CERT_COMPILE_CACHE", str(tmp_path / "cc"))
    from mi300x_cert.workloads.sd import SDWorkload

    p = dict(model="synthetic:sd-tiny", height=64, width=64, steps=10, guidance=7.5, dtype="float16",
             seed=0, device="cuda", optimized_compile=False)
    a = SDWorkload(dict(p, path="stock"))
    b = SDWorkload(dict(p, path="optimized"))
    ids = a.tokenize(a.select_prompts(2, 0))
    cond, uncond = a.encode_prompts(ids)
    lat0 = a.initial_latents(2, 0)
    la = a.denoise(cond, uncond, lat0)
    for _ in range(2):  # first call captures, second replays
        lb = b.denoise(cond, uncond, lat0)
    assert b.fast.notes["denoise_graph"] == "captured"
    rel = float((la.float() - lb.float()).norm() / la.float().norm())
    assert rel < 2e-2, rel
    ia, ib = a.decode(la), b.decode(lb)
    assert float((ia.float() - ib.float()).abs().max()) < 5e-2
    row = b.run_batch(2, 0)
    assert row["unet_evals"] == 11 and b.conditions()["path"] == "optimized"


def test_whisper_smoke_graph_decode_same_tokens():
    from mi300x_cert.workloads.whisper import WhisperWorkload

    p = dict(model="synthetic:whisper-smoke", new_tokens=24, dtype="float16", device="cuda", clips=4)
    a = WhisperWorkload(dict(p, path="stock"))
    b = WhisperWorkload(dict(p, path="optimized"))
    ra, rb = a.run_batch(4, 0), b.run_batch(4, 0)
    assert b.fast.use_graphs and "captured" in b.fast.reason
    assert ra["tokens"] == rb["tokens"] == 4 * 24
    assert torch.equal(a.last_ids, b.last_ids)
