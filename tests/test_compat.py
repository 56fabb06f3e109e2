"""The supported megatron-core range and what differs inside it (megatron_delta/compat.py). The
whole suite runs on 0.16.1 and on 0.19.2 (.ci/run); these tests pin the range itself."""

import pytest

from megatron_delta import cli, compat


@pytest.mark.parametrize("version", [(0, 16, 1), (0, 17, 0), (0, 18, 2), (0, 19, 2), (0, 19, 9)])
def test_supported_releases_pass(version):
    compat.check_supported(version)


@pytest.mark.parametrize("version", [(0, 15, 3), (0, 16, 0), (0, 20, 0), (1, 0, 0)])
def test_releases_outside_the_range_are_one_clear_line(version):
    with pytest.raises(compat.UnsupportedMegatronCore) as error:
        compat.check_supported(version)
    message = str(error.value)
    assert "\n" not in message
    assert f"megatron-core {'.'.join(map(str, version))} is not supported" in message
    assert "pip install 'megatron-core>=0.16.1,<0.20'" in message


def test_installed_release_is_the_one_megatron_reports():
    from megatron.core import package_info

    assert compat.MEGATRON_CORE_VERSION == tuple(package_info.VERSION[:3])
    compat.check_supported()  # the suite runs on a supported release


def test_cli_refuses_an_unsupported_release_before_any_command(monkeypatch, capsys):
    monkeypatch.setattr(compat, "MEGATRON_CORE_VERSION", (0, 20, 0))
    assert cli.main(["plan", "--help"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatron-delta: error: megatron-core 0.20.0 is not supported") and "\n" not in err
