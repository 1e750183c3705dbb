import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_platform_not_hidden_from_repo_root() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system()); print(platform.__file__)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out[0] in {"Linux", "Darwin", "Windows"}
    assert not out[1].startswith(str(ROOT))


def test_platform_folder_is_a_namespace_portion() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_importing_platform_layer_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import lorafleet.platform.config, lorafleet.platform.domain, lorafleet.platform.db\n"
        "import lorafleet.platform.queue, lorafleet.platform.auth\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
