"""The streaming path under grad, threads, fork and interrupts: every output exact, every failure clear, no hang.

Each test that could hang runs its body under a deadline (a worker thread joined with a timeout, or a child process
waited for with one): a hang fails the test instead of wedging the suite.
"""

import collections
import contextlib
import dataclasses
import gc
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from diffusers.utils import BaseOutput
from helpers import tiny_llama, tiny_lm
from torch import nn
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import BaseModelOutput

import accel_nvme
from accel_nvme import NvmeConfig
from accel_nvme.hooks import NvmeAlignDevicesHook

IDS = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
LAYERS = {"embed": "nvme", "body.layers": "nvme", "body.final": "cpu", "head": "cpu"}
DEPTH1 = NvmeConfig(prefetch_depth=1)


def within(seconds, fn, *args):
    """``fn(*args)`` on a worker thread; fails the test if it has not returned after ``seconds`` (a hang)."""
    result, error = [], []

    def run():
        try:
            result.append(fn(*args))
        except BaseException as e:
            error.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds} s: a hang"
    if error:
        raise error[0]
    return result[0]


def nvme_modules(model):
    return [m for m in model.modules() if isinstance(getattr(m, "_hf_hook", None), NvmeAlignDevicesHook)]


def hooks_of(model):
    return [m._hf_hook for m in nvme_modules(model)]


def assert_nothing_in_use(model):
    """No group held, the staging buffers all the prefetcher's, every streamed tensor meta."""
    hooks = hooks_of(model)
    prefetcher = hooks[0].prefetcher
    assert not prefetcher.holders(), "a group is still marked in use"
    owned = prefetcher.buffers_in_use()
    pool = prefetcher.pool.buffers
    assert all(any(b is buffer for b in pool) for buffer in owned), "a slot reads into a stray buffer"
    assert len(prefetcher.pool.buffers) == min(prefetcher.depth + 1, len(prefetcher.sources))
    for module in nvme_modules(model):
        assert not module._hf_hook.holding
        for local, full in module._hf_hook.members.items():
            owner, _, attr = local.rpartition(".")
            tensor = getattr(module.get_submodule(owner), attr)
            assert tensor.device.type == "meta", f"{full} still holds streamed bytes between forwards"


# ------------------------------------------------------------------------------------------------ grad (issue 10.6)


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "checkpoint"
    tiny_llama().save_pretrained(path)
    return path


def load_llama(path, offload_dir):
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers": "nvme",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "nvme",
    }
    return LlamaForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(offload_dir))


def test_a_forward_with_grad_enabled_runs_with_streamed_weights_frozen(llama_checkpoint, offload_dir, caplog):
    reference = LlamaForCausalLM.from_pretrained(llama_checkpoint).eval()
    with torch.no_grad():
        expected = reference(input_ids=IDS).logits
    model = load_llama(llama_checkpoint, offload_dir)
    assert all(p.requires_grad for p in model.model.layers.parameters()), "from_pretrained leaves weights trainable"
    with caplog.at_level(logging.WARNING, logger="accel_nvme.hooks"):
        for _ in range(3):
            out = model(input_ids=IDS)
            assert torch.equal(out.logits, expected)
    frozen = [r for r in caplog.records if "act as frozen" in r.getMessage()]
    assert len(frozen) == 1, "warned once per model"
    assert "'model.layers.0." in frozen[0].getMessage(), "names the first streamed parameter"
    assert out.logits.requires_grad, "the in-RAM weights (embedding) still take part in autograd"


def test_input_and_in_ram_gradients_equal_those_of_the_model_with_frozen_weights(llama_checkpoint, offload_dir):
    reference = LlamaForCausalLM.from_pretrained(llama_checkpoint).eval()
    reference.model.layers.requires_grad_(False)
    reference.lm_head.requires_grad_(False)
    model = load_llama(llama_checkpoint, offload_dir)

    def grads(m):
        embeds = m.model.embed_tokens(IDS).detach().requires_grad_(True)
        m(inputs_embeds=embeds).logits.square().sum().backward()
        m.model.zero_grad(set_to_none=True)
        loss = m(input_ids=IDS).logits.square().sum()
        loss.backward()
        return embeds.grad, m.model.embed_tokens.weight.grad, m.model.norm.weight.grad, loss.detach()

    for expected, actual in zip(grads(reference), grads(model), strict=True):
        assert torch.equal(actual, expected)
    streamed = [p for name, p in model.named_parameters() if name.startswith(("model.layers", "lm_head"))]
    assert streamed and all(p.grad is None for p in streamed), "streamed weights get no .grad"
    assert_nothing_in_use(model)


def test_autograd_never_sees_a_staging_buffer_that_is_refilled(offload_dir):
    """Backward runs after the layers ran again in reverse order, refilling every staging buffer."""
    x = torch.randn(3, 32)
    reference = nn.Sequential(*tiny_lm().body.layers).requires_grad_(False)
    model = accel_nvme.dispatch_model(
        nn.Sequential(*tiny_lm().body.layers),
        {str(i): "nvme" for i in range(4)},
        offload_dir=offload_dir,
        config=DEPTH1,
    )
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    reference(xs[0]).sum().backward()
    first = model(xs[1])
    with torch.no_grad():
        for layer in reversed(model):
            layer(torch.randn(3, 32))
    first.sum().backward()
    assert torch.equal(xs[1].grad, xs[0].grad)


# ---------------------------------------------------------------------------------- outputs that view a weight (14.5)


@dataclasses.dataclass
class PlainOutput:
    sample: torch.Tensor
    extra: list


@dataclasses.dataclass
class DiffusersOutput(BaseOutput):
    sample: torch.Tensor = None


Pair = collections.namedtuple("Pair", "first second")


class ReturnsViews(nn.Module):
    """Returns slices of its own weight inside every container type the libraries return."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.table = nn.Parameter(torch.randn(8, 16), requires_grad=False)

    def forward(self, n):
        v = self.table[:n]
        return {
            "model_output": lambda: BaseModelOutput(last_hidden_state=v, hidden_states=(v, v[:1])),
            "base_output": lambda: DiffusersOutput(sample=v),
            "dataclass": lambda: PlainOutput(sample=v, extra=[{"deep": (v[:2],)}]),
            "nested": lambda: {"a": [v, (v[:1], {"b": Pair(v, v[1:])})]},
        }[self.kind]()


class Tables(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.views = ReturnsViews(kind)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, n):
        out = self.views(n)
        h = torch.ones(n, 16)
        for layer in self.layers:
            h = layer(h)
        return out, h


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from tensors_in(getattr(value, f.name))


@pytest.mark.parametrize("kind", ["model_output", "base_output", "dataclass", "nested"])
def test_outputs_of_every_container_type_hold_owned_tensors(kind, offload_dir):
    torch.manual_seed(0)
    model = Tables(kind).eval()
    with torch.inference_mode():
        reference = model(5)[0]
        expected = [t.clone() for t in tensors_in(reference)]
    model = accel_nvme.dispatch_model(
        model, {"views": "nvme", "layers": "nvme"}, offload_dir=offload_dir, config=DEPTH1
    )
    with torch.inference_mode():
        out, _ = model(5)
        assert type(out) is type(reference)
        for _ in range(3):
            model(5)  # every staging buffer refilled with the other groups' bytes
    staging = model.views._hf_hook.prefetcher.pool.pointers
    got = list(tensors_in(out))
    assert len(got) == len(expected)
    assert all(t.untyped_storage().data_ptr() not in staging for t in got), "an output still views a staging buffer"
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_outputs_that_view_nothing_streamed_are_returned_as_they_are():
    from accel_nvme.hooks import _owned

    inner = torch.ones(2)
    out = BaseModelOutput(last_hidden_state=inner, hidden_states=(inner,))
    assert _owned(out, frozenset()) is out
    assert _owned({"a": [inner]}, frozenset({inner.untyped_storage().data_ptr()}))["a"][0] is not inner


class KeepsItsWeight(nn.Linear):
    """Caches a view of its own weight across forwards: unsupported, and detected."""

    def forward(self, x):
        self.cached = self.weight[:2]
        return super().forward(x)


def test_a_module_keeping_a_view_of_its_streamed_weight_is_a_clear_error(offload_dir):
    model = nn.Sequential(nn.Linear(16, 16), KeepsItsWeight(16, 16), nn.Linear(16, 16)).eval()
    model = accel_nvme.dispatch_model(model, {"0": "nvme", "1": "nvme", "2": "nvme"}, offload_dir=offload_dir)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"keeps 'cached'.*unsupported"):
        model(torch.ones(1, 16))
    assert_nothing_in_use(model)


# -------------------------------------------------------------------------------------------- threads and fork (14.6)


@pytest.mark.parametrize("device_map", [LAYERS, {"": "nvme"}, {"embed": "nvme", "body": "nvme", "head": "cpu"}])
def test_two_threads_forwarding_one_model_get_exact_outputs(device_map, offload_dir):
    inputs = [torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with torch.inference_mode():
        expected = [tiny_lm()(ids) for ids in inputs]
    model = accel_nvme.dispatch_model(tiny_lm(), device_map, offload_dir=offload_dir, config=DEPTH1)
    wrong = []

    def forwards(which):
        with torch.inference_mode():
            for i in range(200):
                try:
                    if not torch.equal(model(inputs[which]), expected[which]):
                        wrong.append((which, i, "wrong output"))
                except Exception as e:
                    wrong.append((which, i, repr(e)))

    def both():
        threads = [threading.Thread(target=forwards, args=(w,), daemon=True) for w in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    within(120, both)
    assert wrong == []
    assert_nothing_in_use(model)


CHILD_FORWARD = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    import accel_nvme
    from accel_nvme import NvmeConfig
    from helpers import tiny_lm
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = tiny_lm()(ids)
    model = accel_nvme.dispatch_model(
        tiny_lm(), {layers!r}, offload_dir={folder!r}, config=NvmeConfig(prefetch_depth=1)
    )
    with torch.inference_mode():
        assert torch.equal(model(ids), expected)
        pids = []
        for _ in range(3):
            model(ids)  # reads of the next forward are in flight at the fork
            pid = os.fork()
            if pid == 0:
                torch.set_num_threads(1)  # torch's OpenMP pool hangs a forked child otherwise, even with no offload
                with torch.inference_mode():
                    in_ram = tiny_lm()(ids)  # at the child's thread count: one thread may sum in another order
                    ok = all(torch.equal(model(ids), in_ram) for _ in range(3))
                os._exit(0 if ok else 3)
            pids.append(pid)
        codes = [os.waitpid(pid, 0)[1] for pid in pids]
        assert torch.equal(model(ids), expected), "the parent after forking"
    print("codes", codes)
    sys.exit(0 if all(code == 0 for code in codes) else 1)
    """
)


def test_a_forked_child_forwards_exactly_and_never_hangs(offload_dir, tmp_path):
    script = tmp_path / "fork.py"
    folder = str(offload_dir)
    script.write_text(CHILD_FORWARD.format(tests=os.path.dirname(__file__), layers=LAYERS, folder=folder))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "codes [0, 0, 0]" in result.stdout


def test_a_child_forked_by_the_test_process_forwards_exactly(offload_dir):
    expected = tiny_lm()(IDS).detach()
    model = accel_nvme.dispatch_model(tiny_lm(), LAYERS, offload_dir=offload_dir, config=DEPTH1)
    with torch.inference_mode():
        model(IDS)
    parent_reader = model.embed._hf_hook.prefetcher.reader
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)  # as DataLoader workers do: torch's OpenMP pool is not fork-safe
            with torch.inference_mode():
                exact = torch.equal(model(IDS), tiny_lm()(IDS))  # one thread may sum in another order than two
            own = model.embed._hf_hook.prefetcher.reader is not parent_reader
            os.write(write, b"exact" if exact and own else b"wrong")
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG)[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in its first forward")
        time.sleep(0.05)
    assert os.read(read, 16) == b"exact"
    os.close(read)
    with torch.inference_mode():
        assert torch.equal(model(IDS), expected)


# --------------------------------------------------------------------------------------------- interrupts (14.7)


class Interrupt:
    """A trace function raising KeyboardInterrupt at the ``at``-th line event of the traced thread's frames.

    ``ours_only`` counts lines of accel_nvme's code only (where the bookkeeping is); otherwise every Python line
    (accelerate, torch, the model) counts, except inside the standard library's own locks and thread pools
    (``threading``, ``concurrent.futures``), whose Python-level internals CPython does not make interrupt-safe.
    Only a line's first execution in each frame counts: Python emits the line event of a ``with`` statement again
    just before calling ``__exit__``, a point where a signal cannot interrupt (CPython checks for signals only after
    the call), and raising there would leak the lock for a reason no Ctrl-C can cause.
    """

    STDLIB_SYNC = (os.sep + "threading.py", os.sep + "concurrent" + os.sep)

    def __init__(self, at, ours_only, only_in=None):
        self.at = at
        self.ours_only = ours_only
        self.only_in = only_in  # count only lines of files whose path ends so
        self.seen = 0

    def __call__(self, frame, event, arg):
        filename = frame.f_code.co_filename
        if (self.ours_only and "accel_nvme" not in filename) or any(part in filename for part in self.STDLIB_SYNC):
            return None
        if self.only_in and not filename.endswith(self.only_in):
            return None
        executed = set()

        def line(frame, event, arg):
            if event == "line" and frame.f_lineno not in executed:
                executed.add(frame.f_lineno)
                self.seen += 1
                if self.seen == self.at:
                    raise KeyboardInterrupt(f"simulated Ctrl-C at line event {self.at}")
            return line

        return line


def traced_forward(model, interrupt):
    with torch.inference_mode():  # outside the trace: an interrupt in the test's own mode switch is not the model's
        sys.settrace(interrupt)
        try:
            return model(IDS)
        finally:
            sys.settrace(None)


@pytest.mark.parametrize(("ours_only", "tries"), [(True, 100), (False, 60)])
def test_an_interrupt_at_any_line_of_a_forward_leaves_the_model_exact(ours_only, tries, offload_dir):
    expected = tiny_lm()(IDS).detach()
    model = accel_nvme.dispatch_model(tiny_lm(), LAYERS, offload_dir=offload_dir, config=DEPTH1)
    counter = Interrupt(0, ours_only)
    within(60, traced_forward, model, counter)
    rng = random.Random(1234 + ours_only)
    interrupted = 0
    for _ in range(tries):
        try:
            within(60, traced_forward, model, Interrupt(rng.randrange(1, counter.seen + 1), ours_only))
        except KeyboardInterrupt:
            interrupted += 1
        assert torch.equal(within(60, traced_forward, model, None), expected)
        assert_nothing_in_use(model)
    assert interrupted >= tries * 3 // 4, f"only {interrupted} of {tries} forwards were interrupted"


GRAD_MODE_FILES = (os.path.join("torch", "autograd", "grad_mode.py"), os.path.join("torch", "utils", "_contextlib.py"))


def test_an_interrupt_inside_a_grad_mode_switch_leaves_no_mode_behind(offload_dir):
    """Ctrl-C at each line of torch's Python grad-mode switches a forward runs: the C++ guard such a switch left half
    made, once collected, must not put a thread into another mode. The streaming path uses C-level guards, so it runs
    none today; a Python ``torch.inference_mode(False)`` in ``_take`` failed here at its 7th line event."""
    expected = tiny_lm()(IDS).detach()
    model = accel_nvme.dispatch_model(tiny_lm(), LAYERS, offload_dir=offload_dir, config=DEPTH1)
    counter = Interrupt(0, False, GRAD_MODE_FILES)
    within(60, traced_forward, model, counter)
    for at in range(1, counter.seen + 1):
        with contextlib.suppress(KeyboardInterrupt):
            within(60, traced_forward, model, Interrupt(at, False, GRAD_MODE_FILES))
        gc.collect()  # a guard left behind is collected here, in this thread, and sets its modes now
        assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == (True, False), f"line event {at}"
    assert torch.equal(within(60, traced_forward, model, None), expected)


def test_an_interrupt_inside_acquire_gives_the_group_back_at_once(offload_dir):
    """Ctrl-C after the prefetcher counted the caller as a holder, before the hook stored its lease."""
    expected = tiny_lm()(IDS).detach()
    model = accel_nvme.dispatch_model(tiny_lm(), LAYERS, offload_dir=offload_dir, config=DEPTH1)
    prefetcher = hooks_of(model)[0].prefetcher
    top_up = prefetcher._top_up  # runs inside ``acquire`` once the caller holds the group

    def interrupted(index, schedule):
        prefetcher._top_up = top_up
        raise KeyboardInterrupt("simulated Ctrl-C inside acquire")

    prefetcher._top_up = interrupted
    with pytest.raises(KeyboardInterrupt, match="inside acquire"), torch.inference_mode():
        model(IDS)
    assert prefetcher.holders() == [], "the interrupted caller still holds its group"
    with torch.inference_mode():
        assert torch.equal(model(IDS), expected)
    assert_nothing_in_use(model)


SIGNALLED = textwrap.dedent(
    """
    import random, signal, sys, torch
    sys.path.insert(0, {tests!r})
    import accel_nvme
    from accel_nvme import NvmeConfig
    from helpers import tiny_lm
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = tiny_lm()(ids).detach()
    model = accel_nvme.dispatch_model(
        tiny_lm(), {layers!r}, offload_dir={folder!r}, config=NvmeConfig(prefetch_depth=1)
    )

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, ctrl_c)
    rng = random.Random(7)
    interrupted = 0
    with torch.inference_mode():
        model(ids)
        for _ in range({tries}):
            try:
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-5, 2e-3))
                for _ in range(20):
                    model(ids)
            except KeyboardInterrupt:
                interrupted += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert torch.equal(model(ids), expected), "wrong output after an interrupt"
    prefetcher = model.embed._hf_hook.prefetcher
    assert not prefetcher.holders()
    print("interrupted", interrupted)
    """
)


def test_ctrl_c_from_a_timer_at_random_moments_never_wedges_the_model(offload_dir, tmp_path):
    script = tmp_path / "signalled.py"
    folder = str(offload_dir)
    script.write_text(SIGNALLED.format(tests=os.path.dirname(__file__), layers=LAYERS, folder=folder, tries=40))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert int(result.stdout.split("interrupted")[-1]) >= 30
