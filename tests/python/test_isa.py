"""The ISA levels (docs/build.md): FOVEAL_ISA forces a level, chosen once per process, so each
case runs in a fresh interpreter; within a level, results are bitwise identical for any thread
count and match the float64 reference."""

import json
import os
import subprocess
import sys

import foveal
import pytest

CHILD = r"""
import json, sys
import numpy as np
import foveal

rng = np.random.default_rng(3)
q = rng.standard_normal((2, 4, 70, 40)).astype(np.float32)
k = rng.standard_normal((2, 2, 150, 40)).astype(np.float32)
v = rng.standard_normal((2, 2, 150, 24)).astype(np.float32)
outs = [foveal.attention(q, k, v, causal=True, num_threads=t) for t in (1, 2, 3)]
same_bits = all(np.array_equal(o.view(np.int32), outs[0].view(np.int32)) for o in outs)

qd, kd, vd = (x.astype(np.float64) for x in (q, k, v))
kd, vd = np.repeat(kd, 2, axis=1), np.repeat(vd, 2, axis=1)
logits = qd @ kd.transpose(0, 1, 3, 2) / np.sqrt(40)
logits[..., np.triu(np.ones((70, 150), bool), k=150 - 70 + 1)] = -np.inf
p = np.exp(logits - logits.max(-1, keepdims=True))
reference = (p / p.sum(-1, keepdims=True)) @ vd
error = float(np.abs(outs[0] - reference).max() / np.abs(reference).max())
print(json.dumps(dict(info=foveal.build_info(), same_bits=same_bits, error=error)))
"""


def run_child(level, code=CHILD):
    env = dict(os.environ, FOVEAL_ISA=level)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_build_info_describes_the_level_in_use():
    info = foveal.build_info()
    assert info["version"] == foveal.__version__
    assert info["compiled_levels"]
    assert set(info["supported_levels"]) <= set(info["compiled_levels"])
    assert info["level"] in info["supported_levels"]
    requested = os.environ.get("FOVEAL_ISA", "") or "auto"
    assert info["requested_level"] == requested
    if requested == "auto":
        assert info["level"] == info["supported_levels"][-1]


@pytest.mark.parametrize("level", [*foveal.build_info()["supported_levels"], "auto"])
def test_each_level_is_bitwise_identical_across_threads_and_matches_the_reference(level):
    result = run_child(level)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = foveal.build_info()["supported_levels"][-1] if level == "auto" else level
    assert report["info"]["level"] == expected
    assert report["same_bits"]
    assert report["error"] < 2e-5


@pytest.mark.parametrize("level", ["avx1024", "AVX2", "native", "sse2"])
def test_a_bad_level_is_a_clear_error_and_nothing_is_written(level):
    code = r"""
import numpy as np
import foveal
q = np.ones((1, 2, 3, 8), np.float32)
out = np.full((1, 2, 3, 8), 7, np.float32)
for call in (lambda: foveal.attention(q, q, q, out=out), foveal.build_info):
    try:
        call()
    except ValueError as error:
        print(error)
    else:
        raise SystemExit("no error")
assert (out == 7).all(), "attention wrote its output"
"""
    result = run_child(level, code)
    assert result.returncode == 0, result.stderr + result.stdout
    messages = result.stdout.strip().splitlines()
    assert len(messages) == 2
    for message in messages:
        assert f"FOVEAL_ISA={level}" in message
        assert "accepted: auto, " in message
        for name in foveal.build_info()["compiled_levels"]:
            assert name in message
