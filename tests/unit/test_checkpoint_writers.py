"""The writing side of a checkpoint on real files: UncachedFile writes exactly what it is given,
whatever the sizes of the writes, around the page cache and through it (where O_DIRECT is
refused); a failed write leaves nothing open; and a save leaves torch.save's options as it found them."""

from __future__ import annotations

import os

import pytest
import torch

from app.checkpoint import CheckpointStore
from app.checkpoint.writers import UncachedFile


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("buffer_size", [8192, 1 << 20])
def test_an_uncached_file_holds_exactly_what_was_written(tmp_path, buffer_size, direct):
    rng = torch.Generator().manual_seed(0)
    # Small and large writes, crossing buffer boundaries, ending in a partial block.
    sizes = [0, 1, 63, 4096, 5000, buffer_size - 7, 3 * buffer_size + 11, 100, 12_345]
    pieces = [torch.randint(0, 256, (size,), dtype=torch.uint8, generator=rng).numpy().tobytes() for size in sizes]
    path = tmp_path / "uncached.bin"
    with UncachedFile(str(path), buffer_size=buffer_size, direct=direct) as file:
        if not direct:
            assert not file.direct
        for i, piece in enumerate(pieces):
            written = file.write(memoryview(piece) if i % 2 else piece)  # as torch.save hands them
            assert written == len(piece)
        assert file.tell() == sum(sizes)
    assert path.read_bytes() == b"".join(pieces)
    assert file.closed


def test_writes_that_o_direct_refuses_go_through_the_cache(tmp_path):
    """A buffer of no whole number of blocks makes O_DIRECT's writes unaligned, as a device of
    larger blocks would: refused (EINVAL) where O_DIRECT is honoured, then written through the cache."""
    data = torch.randint(0, 256, (50_000,), dtype=torch.uint8).numpy().tobytes()
    with UncachedFile(str(tmp_path / "odd"), buffer_size=5000) as file:
        file.write(data)
    assert (tmp_path / "odd").read_bytes() == data


def test_an_empty_uncached_file_and_a_float_tensor_view(tmp_path):
    with UncachedFile(str(tmp_path / "empty")):
        pass
    assert (tmp_path / "empty").read_bytes() == b""
    values = torch.arange(10_000, dtype=torch.float32)
    with UncachedFile(str(tmp_path / "floats"), buffer_size=8192) as file:
        file.write(memoryview(values.numpy()))  # a memoryview of 4-byte items
    assert torch.equal(torch.frombuffer(bytearray((tmp_path / "floats").read_bytes()), dtype=torch.float32), values)


def test_a_failed_write_closes_the_file_without_syncing_it(tmp_path):
    # The file's block writes, then fails: the failure is raised through the file's __exit__.
    with pytest.raises(RuntimeError, match="serialisation failed"):  # noqa: SIM117, PT012
        with UncachedFile(str(tmp_path / "failed"), buffer_size=8192) as file:
            file.write(b"x" * 10_000)
            raise RuntimeError("serialisation failed")
    assert file.closed
    with pytest.raises(OSError):  # noqa: PT011 (EBADF, whose text depends on the platform)
        os.fstat(file.fileno())  # the descriptor was released


def test_a_save_leaves_torch_save_checksums_as_it_found_them(tmp_path, single_process_group):
    store = CheckpointStore(tmp_path, keep_last=1, rank=0)
    state = {"model": {"w": torch.arange(12.0).reshape(4, 3)}}
    for step, setting in enumerate((True, False), start=1):
        torch.serialization.set_crc32_options(setting)
        try:
            path = store.save(step, state, {})
            assert torch.serialization.get_crc32_options() is setting
        finally:
            torch.serialization.set_crc32_options(True)
        target = {"model": {"w": torch.zeros(4, 3)}}
        store.load(path, target)
        assert torch.equal(target["model"]["w"], state["model"]["w"])
