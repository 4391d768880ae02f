import os

import pytest
import torch

import mplib.env as env


def test_seed_everything_repeats_random_numbers():
    env.seed_everything(3)
    a = torch.randn(4)
    env.seed_everything(3)
    torch.testing.assert_close(torch.randn(4), a)


def test_get_devices_gives_n_devices_of_one_kind():
    devices = env.get_devices(3)
    assert len(devices) == 3
    if env.gpu_count() >= 3:
        assert devices == [torch.device("cuda", i) for i in range(3)]
    else:
        assert devices == [torch.device("cpu")] * 3
        assert env.are_stand_ins(devices)


@pytest.mark.parametrize("n", [0, -2])
def test_get_devices_rejects_fewer_than_one_device(n):
    with pytest.raises(ValueError, match=rf"at least 1 device, got {n}.*has \['cpu'"):
        env.get_devices(n)


@pytest.mark.parametrize("bad", ["gpu:0", "tpu", "cuda:x", 3])
def test_check_device_rejects_unknown_devices_naming_what_exists(bad):
    with pytest.raises(ValueError, match=r"unknown device .*This machine has \['cpu'"):
        env.check_device(bad)


def test_check_device_rejects_a_gpu_this_machine_lacks():
    missing = f"cuda:{env.gpu_count() + 5}"
    with pytest.raises(ValueError, match=rf"{missing}.* has {env.gpu_count()} GPU"):
        env.check_device(missing)


def test_prefer_cuda_without_enough_gpus_is_an_error():
    with pytest.raises(ValueError, match="GPUs but this machine has"):
        env.get_devices(env.gpu_count() + 1, prefer="cuda")


def test_describe_names_torch_and_the_gpus(capsys):
    text = env.describe()
    assert torch.__version__ in text and "GPU" in text
    assert text in capsys.readouterr().out
    assert env.cpu() in text


def test_cpu_names_the_vector_instructions_torch_uses():
    text = env.cpu()
    assert torch.backends.cpu.get_cpu_capability() in text
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            vnni = any(flag in f.read().split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))
        assert text.endswith("(VNNI): " + ("yes" if vnni else "no"))


@pytest.mark.cuda
def test_get_devices_returns_real_gpus_when_present():
    assert env.get_devices(1) == [torch.device("cuda", 0)]
