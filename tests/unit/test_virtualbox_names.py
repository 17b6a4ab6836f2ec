"""The VirtualBox adapter takes a clone name only when all of it is usable: the same rule as
libvirt's, so a name with a trailing newline is refused before VirtualBox is asked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepipe.errors import FatalHypervisorError
from imagepipe.hypervisors.virtualbox.hypervisor import VirtualBoxHypervisor
from tests import vboxsim


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[VirtualBoxHypervisor]:
    host = vboxsim.start(tmp_path / "vbox")
    adapter = VirtualBoxHypervisor(stop_poll=0.05)
    yield adapter
    adapter.close()
    vboxsim.stop(host)


@pytest.mark.parametrize("name", ["lab-1\n", "lab-1\nlab-2", "lab/1", "-lab", "x" * 64])
def test_a_clone_name_with_anything_after_a_usable_name_is_refused(
    hv: VirtualBoxHypervisor, name: str
) -> None:
    with pytest.raises(FatalHypervisorError, match="is not usable"):
        hv.delete(name)
    with pytest.raises(FatalHypervisorError, match="is not usable"):
        hv.display(name)
