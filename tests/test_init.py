"""The SVD init (svfit.core.factorize): single-threaded SVDs in a bounded pool, one matrix at a time on an
accelerator, and shared between torch.distributed ranks with identical results everywhere."""

import threading
import time
import warnings

import pytest
import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from ranks import gloo_group, run_ranks
from torch import nn

import svfit
from svfit.core.factorize import Job, deal, run_jobs
from svfit.core.spectrum import thin_svd
from svfit.tuner import SVFitLayer


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 40),
                         nn.Tanh(), nn.Linear(40, 8))


TARGETS = ["0", "2", "4", "6"]


def _bases(model):
    return {name: tuple(c["default"].detach().clone() for c in (m.basis_U, m.svfit_sigma, m.basis_V) if "default" in c)
            for name, m in model.named_modules() if isinstance(m, SVFitLayer)}


def _in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_bases_do_not_depend_on_the_process_thread_count():
    old = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(_bases(get_peft_model(_model(), svfit.SVFitConfig(target_modules=TARGETS))))
    finally:
        torch.set_num_threads(old)
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 4
    for name in runs[0]:
        for a, b in zip(runs[0][name], runs[1][name]):
            assert torch.equal(a, b), name  # bit for bit: every SVD ran single-threaded either way


def test_init_leaves_the_thread_settings_of_the_process_alone():
    main, fresh = torch.get_num_threads(), _in_thread(torch.get_num_threads)
    get_peft_model(_model(), svfit.SVFitConfig(target_modules=TARGETS))
    assert torch.get_num_threads() == main
    assert _in_thread(torch.get_num_threads) == fresh  # the default that threads created later inherit


def test_the_pool_gives_the_bits_of_a_single_threaded_svd():
    model = get_peft_model(_model(), svfit.SVFitConfig(target_modules=TARGETS, r="full", bases="both"))
    layer = model.base_model.model[2]
    W = layer.get_base_layer().weight.detach()

    def reference():
        from threadpoolctl import threadpool_limits

        torch.get_num_threads()
        with threadpool_limits(1, user_api="openmp"):
            return thin_svd(W, "full")

    ref = _in_thread(reference)
    assert torch.equal(layer.basis_U["default"], ref.U) and torch.equal(layer.basis_V["default"], ref.V)


def test_jobs_run_in_parallel_largest_first_on_the_cpu():
    running, peak, order, lock = [0], [0], [], threading.Lock()

    def job(name, cost):
        def run(device):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                order.append(name)
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            return name
        return Job(name, cost, run)

    results, report = run_jobs([job("small", 1), job("big", 9), job("mid", 5)], workers=2, split=False)
    assert results == {"small": "small", "big": "big", "mid": "mid"}
    assert order[0] == "big" and peak[0] == 2 and report.workers == 2 and report.factorised == 3


def test_accelerator_jobs_run_one_matrix_at_a_time():
    running, peak, seen = [0], [0], []

    def job(name, cost):
        def run(device):
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            seen.append((name, device))
            running[0] -= 1
            return name
        return Job(name, cost, run)

    _, report = run_jobs([job("a", 1), job("b", 2)], device=torch.device("meta"), split=False)
    assert peak[0] == 1 and [n for n, _ in seen] == ["b", "a"] and {d.type for _, d in seen} == {"meta"}
    assert report.workers == 1


def test_jobs_are_dealt_to_ranks_by_cost():
    jobs = [Job(str(i), cost, None) for i, cost in enumerate([8, 7, 6, 5, 4, 3, 2, 1])]
    owners = deal(jobs, 2)
    load = [sum(j.cost for j in jobs if owners[j.name] == k) for k in (0, 1)]
    assert sorted(owners.values()).count(0) == 4 and load == [18, 18]


def test_svd_device_must_be_usable():
    with pytest.raises(ValueError, match="svd_device must be"):
        svfit.SVFitConfig(svd_device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="svd_device='cuda'.*cannot use that device"):
            get_peft_model(_model(), svfit.SVFitConfig(target_modules=TARGETS, svd_device="cuda"))


def test_svd_on_another_device_is_another_cache_entry(tmp_path):
    svfit.set_svd_cache(tmp_path)
    try:
        get_peft_model(_model(), svfit.SVFitConfig(target_modules=["0"]))
        get_peft_model(_model(), svfit.SVFitConfig(target_modules=["0"], svd_device="cpu"))
        assert len(list(tmp_path.glob("*.safetensors"))) == 1  # "auto" on a machine without accelerator is the CPU
        from svfit.core.fingerprint import fingerprint
        from svfit.tuner.factorization import cache_key

        base = _model()[0]
        fp, config = fingerprint(base.weight), svfit.SVFitConfig()
        on = {d: cache_key(fp, base.weight.shape, False, config, "Linear", d, 5) for d in ("cpu", "cuda", "xpu")}
        assert len(set(on.values())) == 3
    finally:
        svfit.set_svd_cache(None)


# -- two ranks -----------------------------------------------------------------------------------------------------


def _ranks_worker(rank, world, port, out, adapter_dir, alone):
    with gloo_group(rank, world, port, out, LOCAL_WORLD_SIZE=str(world), SVFIT_SVD_SPLIT_TIMEOUT="2"):
        result = {}
        if alone:
            if rank == 0:  # rank 1 never adapts anything: rank 0 must not wait for it forever
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    model = get_peft_model(_model(), svfit.SVFitConfig(target_modules=TARGETS))
                report = model.base_model.svfit_init_report["default"]
                result = {"factorised": report.factorised, "warned": [str(w.message) for w in caught]}
            dist.barrier()
        else:
            model = get_peft_model(_model(), svfit.SVFitConfig(target_modules=TARGETS))
            report = model.base_model.svfit_init_report["default"]
            result["bases"] = _bases(model)
            result["factorised"], result["per_rank"] = report.factorised, report.per_rank
            if rank == 0:
                model.save_pretrained(adapter_dir)
            dist.barrier()
            loaded = PeftModel.from_pretrained(_model(), adapter_dir)
            result["loaded"] = _bases(loaded)
            result["loaded_factorised"] = loaded.base_model.svfit_init_report["default"].factorised
        torch.save(result, f"{out}.{rank}")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")
def test_two_ranks_share_the_svds_and_end_with_identical_bases(tmp_path):
    out = run_ranks(_ranks_worker, tmp_path, str(tmp_path / "adapter"), False)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["per_rank"] == [2, 2] and r0["factorised"] == r1["factorised"] == 2
    alone = _bases(get_peft_model(_model(), svfit.SVFitConfig(target_modules=TARGETS)))
    for result in (r0, r1):
        for key in ("bases", "loaded"):
            assert result[key].keys() == alone.keys()
            for name in alone:
                for a, b in zip(result[key][name], alone[name]):
                    assert torch.equal(a, b), (key, name)  # bit-identical on every rank, and to one process
    assert r0["loaded_factorised"] == r1["loaded_factorised"] == 2  # the reload is shared the same way


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")
def test_a_rank_that_adapts_alone_does_not_hang(tmp_path):
    out = run_ranks(_ranks_worker, tmp_path, str(tmp_path / "adapter"), True)
    r0 = torch.load(f"{out}.0")
    assert r0["factorised"] == 4
    assert any("factorised all of them itself" in w for w in r0["warned"])
