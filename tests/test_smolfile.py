"""The Smolfile: the example parses; every mistake is one line naming the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smolvmm import ConfigError, ImageError, ImageRecipe, NetConfig, PortForward, ReadyCondition, load_smolfile
from smolvmm.oci import build

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "smolfile" / "Smolfile"


def test_the_example_smolfile_gives_its_recipe() -> None:
    recipe = load_smolfile(EXAMPLE)
    assert recipe.image == "docker://127.0.0.1:5000/debian-python:bookworm"
    assert (recipe.vcpus, recipe.memory, recipe.disk_headroom) == (1, 512 << 20, 256 << 20)
    assert recipe.env == {"GREETING": "hello from the Smolfile"} and recipe.workdir == "/srv/www"
    assert recipe.files == ((EXAMPLE.parent / "hello.txt", "/srv/www/hello.txt"),)
    assert recipe.cmd == ("python3", "-m", "http.server", "8000") and len(recipe.steps) == 1
    assert recipe.ready == ReadyCondition("port", "8000")
    assert load_smolfile(EXAMPLE, vcpus=2).vcpus == 2  # flags win


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('image = "oci:x"\ncolour = "red"', "unknown key 'colour'"),
        ("cpus = 2", "'image' is required"),
        ('image = "oci:x"\ncpus = "two"', "'cpus' must be an integer"),
        ('image = "oci:x"\nenv = { A = 1 }', "'env' must be a table of strings"),
        ('image = "oci:x"\nrun = "make"', "'run' must be a list of strings"),
        ('image = "oci:x"\nmemory = "lots"', "'memory': invalid size"),
        # checked as --cpus, --mem and MachineConfig check them: before the image is fetched
        ('image = "oci:x"\ncpus = -3', "'cpus' must be an int from 1 to 64, not -3"),
        ('image = "oci:x"\ncpus = 65', "'cpus' must be an int from 1 to 64, not 65"),
        ('image = "oci:x"\nmemory = "99999G"', "'memory' must be a number of bytes, a multiple of 2 MiB"),
        ('image = "oci:x"\nmemory = "3M"', "'memory' must be a number of bytes, a multiple of 2 MiB"),
        ('image = "oci:x"\nenv = { "A=B" = "x" }', "'env' names must be non-empty str without '='"),
        ('image = "oci:x"\n[ready]\nport = 1\nexec = "true"', "exactly one of"),
        ('image = "oci:x"\n[ready]\nport = 70000', "'ready.port'"),
        ('image = "oci:x"\n[ready]\nwhen = "now"', "unknown key 'ready.when'"),
        ('image = "oci:x"\n[[copy]]\nfrom = "missing.txt"\nto = "/x"', "'copy[0].from' 'missing.txt' is not a file"),
        ('image = "oci:x"\n[[copy]]\nfrom = "Smolfile"\nto = "x"', "'copy[0].to' must be an absolute guest path"),
        ('image = "oci:x"\n[[copy]]\nsrc = "a"', "unknown key 'copy[0].src'"),
        ("image = [", "not valid TOML"),
        ('image = "oci:x"\nkernel = "bzImage"', "'kernel' must be \"minimal\""),
        ('image = "oci:x"\nnet = "user"', "'net' must be a list of strings"),
        ('image = "oci:x"\nnet = ["bridge"]', "'net': invalid network 'bridge'"),
    ],
)
def test_each_mistake_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    smolfile = tmp_path / "Smolfile"
    smolfile.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_smolfile(smolfile)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert str(raised.value).startswith(f"Smolfile {smolfile}")


def test_a_recipe_keeps_its_defaults() -> None:
    recipe = ImageRecipe("oci:x")
    assert recipe.ready is None and recipe.steps == () and recipe.memory == 512 << 20
    assert recipe.kernel is None  # the Debian cloud kernel
    assert recipe.networks is None  # user networking where the host can give it


def test_a_recipe_names_its_networks(tmp_path: Path) -> None:
    smolfile = tmp_path / "Smolfile"
    smolfile.write_text('image = "oci:x"\nnet = ["user,forward=8080:80"]')
    assert load_smolfile(smolfile).networks == (NetConfig(forwards=(PortForward(8080, 80),)),)
    smolfile.write_text('image = "oci:x"\nnet = ["none"]')
    assert load_smolfile(smolfile).networks == ()
    assert load_smolfile(smolfile, networks=None).networks is None  # flags win
    with pytest.raises(ConfigError, match="ImageRecipe.networks must be None or a tuple of NetConfig"):
        ImageRecipe("oci:x", networks=[NetConfig()])  # type: ignore[arg-type]


def test_a_recipe_may_ask_for_the_minimal_kernel_and_nothing_else(tmp_path: Path) -> None:
    smolfile = tmp_path / "Smolfile"
    smolfile.write_text('image = "oci:x"\nkernel = "minimal"')
    assert load_smolfile(smolfile).kernel == "minimal"
    with pytest.raises(ConfigError, match="ImageRecipe.kernel must be 'minimal' or None"):
        ImageRecipe("oci:x", kernel="bzImage")  # type: ignore[arg-type]


def _copying(smolfile: Path, source: str) -> Path:
    """The host file a Smolfile copying ``source`` copies."""
    smolfile.write_text(f'image = "oci:x"\n[[copy]]\nfrom = "{source}"\nto = "/x"\n')
    ((path, _),) = load_smolfile(smolfile).files
    return path


def test_copies_come_from_the_smolfiles_directory_only(tmp_path: Path) -> None:
    """A Smolfile may be someone else's: it must not copy the host's files (/etc/shadow) into an image."""
    context = tmp_path / "context"
    (context / "sub").mkdir(parents=True)
    (context / "sub" / "app.conf").write_text("conf")
    (context / "inside").symlink_to("sub/app.conf")
    (tmp_path / "secret").write_text("secret")
    (context / "outside").symlink_to(tmp_path / "secret")
    (context / "up").symlink_to("..")
    smolfile = context / "Smolfile"
    assert _copying(smolfile, "sub/app.conf") == context / "sub" / "app.conf"
    assert _copying(smolfile, "inside") == context / "sub" / "app.conf"  # a symlink that stays inside
    assert _copying(smolfile, "sub/../sub/app.conf") == context / "sub" / "app.conf"
    for source, message in [
        ("/etc/shadow", "is an absolute path"),
        (str(tmp_path / "secret"), "is an absolute path"),
        ("../secret", "leads outside"),
        ("../../../../../../../../etc/shadow", "leads outside"),
        ("outside", "leads outside"),
        ("up/secret", "leads outside"),
    ]:
        with pytest.raises(ConfigError) as raised:
            _copying(smolfile, source)
        expected = f"Smolfile {smolfile}: 'copy[0].from' {source!r} {message}"
        assert str(raised.value).startswith(expected) and "\n" not in str(raised.value)


def test_a_copy_source_swapped_after_the_check_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Smolfile's directory may be someone else's too: a source they swap between the check and the
    copy, for a symlink out of it or a FIFO (whose read would wait for ever), is refused when opened."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "app.conf").write_text("conf")
    (tmp_path / "secret").write_text("secret")
    smolfile = context / "Smolfile"
    smolfile.write_text('image = "oci:x"\n[[copy]]\nfrom = "app.conf"\nto = "/x"\n')
    recipe = load_smolfile(smolfile)
    assert recipe.context == context.resolve()
    ((source, _),) = recipe.files
    assert build._read_source(source, recipe.context) == (b"conf", source.stat().st_mode & 0o777)
    source.unlink()
    source.symlink_to(tmp_path / "secret")
    with pytest.raises(ImageError, match="now leads outside"):
        build._read_source(source, recipe.context)
    source.unlink()
    os.mkfifo(source)
    with pytest.raises(ImageError, match="not a regular file"):
        build._read_source(source, recipe.context)
    source.unlink()
    source.write_bytes(bytes(11))
    monkeypatch.setattr(build, "MAX_COPIED_FILE", 10)
    with pytest.raises(ImageError, match="is larger than"):
        build._read_source(source, recipe.context)
