"""The one rule for random draws (calm_core/rng.py): a draw is made on its generator's device.

CUDA refuses a CPU generator for a CUDA draw; the CPU and meta devices accept anything, so a CPU
test cannot see the bug by itself. These tests (1) make every torch draw primitive behave like
CUDA (raise when the generator's device differs from the draw's), (2) record where every draw
comes from while the model code runs its training, evaluation and generation paths, and
(3) scan calm_core's source for draw calls outside calm_core/rng.py.
"""

import ast
import inspect
from pathlib import Path

import pytest
import torch

import calm_core
from calm_core import rng
from calm_core.autoencoder import ChunkAutoencoder, reconstruction_metrics
from calm_core.baseline import TokenLM
from calm_core.calm_model import CALM
from calm_core.config import AEConfig, HeadConfig, ModelConfig
from calm_core.evaluate import baseline_heldout, calm_heldout
from calm_core.generate import generate

CORE = Path(calm_core.__file__).parent
PRIMITIVES = ("rand", "randn", "randint", "multinomial", "bernoulli", "normal", "rand_like", "randn_like",
              "randint_like", "randperm", "poisson")


@pytest.fixture
def strict_draws(monkeypatch):
    """Every torch draw primitive raises like CUDA on a generator/device mismatch, and records the
    calm_core file that called it."""
    calls = []

    def wrap(name, fn):
        def strict(*args, **kwargs):
            g = kwargs.get("generator")
            if "device" in kwargs and kwargs["device"] is not None:
                dev = torch.device(kwargs["device"])
            else:
                t = next((a for a in args if isinstance(a, torch.Tensor)), None)
                dev = t.device if t is not None else torch.device("cpu")
            if g is not None and g.device.type != dev.type:
                raise RuntimeError(f"Expected a '{dev.type}' device type for generator but found '{g.device.type}'")
            caller = next(f for f in inspect.stack()[1:] if "/torch/" not in f.filename)
            calls.append((name, Path(caller.filename).resolve(), dev.type))
            return fn(*args, **kwargs)
        return strict

    for name in PRIMITIVES:
        monkeypatch.setattr(torch, name, wrap(name, getattr(torch, name)))
    return calls


def test_a_cpu_generator_for_a_meta_draw_fails_like_cuda_and_the_rule_avoids_it(strict_draws):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match="device type for generator"):
        torch.rand(3, device="meta", generator=g)  # what the old code did, on CUDA
    x = rng.uniform((3, 4), "meta", g)
    assert x.device.type == "meta" and x.shape == (3, 4)
    assert rng.normal((2,), "meta", g).device.type == "meta"
    with pytest.raises(RuntimeError, match="device type for generator"):  # the old multinomial on CUDA, likewise
        torch.multinomial(torch.ones(5, 7, device="meta"), 1, generator=g)


def test_seeded_draws_do_not_depend_on_the_target_device():
    a = rng.normal((4, 3), "cpu", torch.Generator().manual_seed(1))
    b = rng.normal((4, 3), "meta", torch.Generator().manual_seed(1))  # drawn on the CPU, then moved
    assert b.device.type == "meta" and torch.equal(a, rng.normal((4, 3), "cpu", torch.Generator().manual_seed(1)))
    p = torch.tensor([[0.1, 0.9], [0.8, 0.2]]).expand(500, 2, 2).reshape(-1, 2)
    assert torch.equal(rng.categorical(p, torch.Generator().manual_seed(2)),
                       rng.categorical(p, torch.Generator().manual_seed(2)))


def test_every_draw_of_the_model_code_goes_through_the_rule(strict_draws):
    torch.manual_seed(0)
    V, K, LAT = 20, 4, 8  # K >= 4: BrierLM compares up to 4 tokens of a chunk
    a = AEConfig(K=K, latent_dim=LAT, d_model=32, ffn_dim=64)
    m = ModelConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, block_chunks=6, input_mode="both")
    ae = ChunkAutoencoder(a, V, mask_id=V - 1, pad_id=V - 2)
    ae.train()(torch.randint(0, V - 2, (8, K)))  # masking, posterior sample
    reconstruction_metrics(ae, torch.randint(0, V - 2, (8, K)), V - 2, 0.3, torch.Generator().manual_seed(0))
    ae.eval()
    val = {"tokens": torch.randint(0, V - 2, (3, 6, K)), "mu": torch.randn(3, 6, LAT), "log_sigma": -torch.ones(3, 6, LAT)}
    for head in (HeadConfig(arch="paper", input_noise_std=0.1), HeadConfig(arch="adanorm"), HeadConfig(kind="quadratic")):
        model = CALM(m, head, a, V)
        model.train()(val["tokens"], val["mu"], val["log_sigma"]).loss.backward()  # global RNG (training)
        calm_heldout(model, ae, val, 2, samples=2, seed=0)
        for T, sampler in ((1.0, "batch"), (0.5, "batch"), (0.5, "exact")):
            generate(model.eval(), ae, val["tokens"][:2, :3], 2, T, candidates=8,
                     generator=torch.Generator().manual_seed(0), sampler=sampler)
    lm = TokenLM(m, V, K)
    baseline_heldout(lm, val, 2, K, samples=2, seed=0)
    lm.generate(torch.randint(0, V, (2, 4)), 3, 0.7, generator=torch.Generator().manual_seed(0))
    assert len(strict_draws) > 20
    assert {name for name, _, _ in strict_draws} >= {"rand", "randn", "multinomial"}
    outside = {(n, str(f)) for n, f, _ in strict_draws if f.is_relative_to(CORE) and f != CORE / "rng.py"}
    assert not outside, f"draws in calm_core outside calm_core/rng.py: {outside}"


def test_no_draw_call_in_calm_core_source_outside_rng():
    """A static check for code paths the run above does not reach: no torch.<draw>(...) and no
    in-place .uniform_/.normal_/.bernoulli_/.exponential_ on tensors (nn.init is weight init)."""
    in_place = {"uniform_", "normal_", "bernoulli_", "exponential_", "random_", "geometric_", "cauchy_"}
    found = []
    for path in sorted(CORE.glob("*.py")):
        if path.name == "rng.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if (owner == "torch" and node.func.attr in PRIMITIVES) or (
                        node.func.attr in in_place and not owner.startswith("nn.init")):
                    found.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
    assert not found, found
