"""The kernel package is a leaf: nothing in ``hellm_kernels`` imports ``hellm_ds`` (issue 14, requirement 3).

``hellm_ds`` builds its graph operators on top of the kernel package's own types (``hellm_kernels.csr``,
``hellm_kernels.operators``); the reverse direction would make the kernels unusable without the trainer.
Checked twice: statically (every import statement of every module, also those inside functions), and by
importing every module and running a small SpMM and propagation in a process where ``import hellm_ds``
raises.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kernels" / "hellm_kernels"
FORBIDDEN = "hellm_ds"


def _forbidden(name: str | None) -> bool:
    return name is not None and (name == FORBIDDEN or name.startswith(FORBIDDEN + "."))


def _imports_of(path: Path) -> list[str]:
    """``file:line: import ...`` for every import of hellm_ds in ``path``, at any nesting level, including
    ``importlib.import_module("hellm_ds...")`` / ``__import__("hellm_ds...")`` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names: list[str | None] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if _forbidden(n)]
    return found


def test_no_module_of_the_kernel_package_imports_hellm_ds():
    modules = sorted(PACKAGE.glob("*.py"))
    assert {"__init__.py", "csr.py", "operators.py", "spmm.py", "autograd.py"} <= {m.name for m in modules}
    offending = [hit for m in modules for hit in _imports_of(m)]
    assert not offending, "the kernel package must not import hellm_ds:\n" + "\n".join(offending)


_CHILD = r"""
import importlib, pkgutil, sys
from pathlib import Path
sys.modules["hellm_ds"] = None  # any `import hellm_ds...` now raises ImportError
import hellm_kernels
assert Path(hellm_kernels.__file__).resolve().parent == Path(sys.argv[1]).resolve(), hellm_kernels.__file__
for m in pkgutil.iter_modules(hellm_kernels.__path__):
    importlib.import_module("hellm_kernels." + m.name)

import torch
from hellm_kernels import lightgcn_propagate, propagate, sparse_mm, spmm
from hellm_kernels.csr import CSR
from hellm_kernels.operators import BipartiteOperator, TwoStageOperator
from hellm_kernels.cuda_compile import sample_operators

R = CSR.from_coo([0, 0, 1, 2, 2], [0, 2, 1, 0, 1], (3, 3))
X = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
dense = R.to_dense()
assert torch.allclose(spmm(R, X.detach(), backend="torch"), dense @ X.detach())
op = TwoStageOperator(R, R.transpose(), a=torch.full((3,), 0.5), b=None, c=torch.ones(3))
Y = propagate(op, X, 2, "sum", backend="torch")
P = op.to_dense()
assert torch.allclose(Y, X + P @ X + P @ P @ X)
Y.sum().backward()
assert X.grad is not None
ui = BipartiteOperator(R, R.transpose(), torch.ones(3), torch.ones(3))
lightgcn_propagate(ui, torch.randn(3, 4), torch.randn(3, 4), 1, backend="torch")
sparse_mm(R, torch.randn(3, 4), backend="torch")
for index_dtype in (torch.int32, torch.int64):
    R2, RT2, u2u, i2i, lgcn = sample_operators(index_dtype)
    propagate(u2u, torch.randn(u2u.n, 8), 1, backend="torch")
    propagate(i2i, torch.randn(i2i.n, 8), 1, backend="torch")
    lightgcn_propagate(lgcn, torch.randn(R2.shape[0], 8), torch.randn(R2.shape[1], 8), 1, backend="torch")
assert not any(k == "hellm_ds" or k.startswith("hellm_ds.") for k, v in sys.modules.items() if v is not None)
print("leaf ok")
"""


def test_kernel_package_works_where_hellm_ds_cannot_be_imported(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "kernels"))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(PACKAGE)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "leaf ok" in proc.stdout, proc.stderr[-3000:]
