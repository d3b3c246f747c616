"""What the index projects onto and what it is preconditioned with: analyze.py's fitted factors, found in
their folder and checked to be of this model, these images and this seed, then read as kronfluence
reads them (the query's preconditioning) or as their eigenvectors (the index's projections)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from kronfluence.arguments import FactorArguments
from kronfluence.utils.constants import (
    ACTIVATION_EIGENVALUES_NAME,
    ACTIVATION_EIGENVECTORS_NAME,
    GRADIENT_EIGENVALUES_NAME,
    GRADIENT_EIGENVECTORS_NAME,
)
from kronfluence.utils.exceptions import FactorsNotFoundError
from safetensors import SafetensorError, safe_open

from influence.index import projection
from influence.index.shards import GAUSSIAN
from influence.results import naming
from influence.results.records import check_same_arch, recorded_arch, split_model_source
from influence.runtime.cli import UserError

HALF_FLAG = " --use_half_precision"


def index_projections(
    basis: str, seed: int, output_dir: str | Path, analysis_name: str, plan: Sequence[projection.LayerProjection],
    train_provenance: Dict[str, Any], half: bool = False,
) -> Tuple[projection.Projections, Dict[str, Any]]:
    """The index's projections for --basis, and what they depend on: the seed for gaussian ones, the
    fitted factors' record id for an eigenvector basis (refitted factors make a stale index), and their
    precision when they are analyze.py's --use_half_precision ones."""
    if basis == GAUSSIAN:
        return projection.Projections.draw(plan, seed), {"projection": projection.PROJECTION_SCHEME}
    command = f"analyze.py --factor_strategy {basis}{HALF_FLAG if half else ''}"
    hint = f"--basis {basis} projects onto their eigenvectors: run `{command}` with the same --dataset_dir, model and --output_dir/--analysis_name first, or pass --basis gaussian"
    record, directory = factor_record(output_dir, analysis_name, seed, basis, train_provenance, hint, half)
    if record is None:
        raise UserError(f"no {basis} factors in {directory}: {hint}")
    names = (ACTIVATION_EIGENVECTORS_NAME, ACTIVATION_EIGENVALUES_NAME, GRADIENT_EIGENVECTORS_NAME, GRADIENT_EIGENVALUES_NAME)
    paths = [directory / f"{name}.safetensors" for name in names]
    if not all(path.is_file() for path in paths):
        raise UserError(f"the {basis} factors in {directory} have no eigendecomposition yet (unfinished): run the same `{command}` command again")
    try:
        handles = [safe_open(str(path), framework="pt") for path in paths]
        projections = projection.Projections.eigen(plan, lambda name: tuple(handle.get_tensor(name) for handle in handles))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"the {basis} factors in {directory} cannot be read as this model's ({error}); refit them with `{command} --overwrite`") from None
    precision = {"basis_factors": naming.factors_name(basis, half)} if half else {}  # float32 indexes keep their record as it was
    return projections, {"projection": projection.EIGEN_SCHEME, "basis_factors_id": record["id"], **precision}


def index_depends_on(train_provenance: Dict[str, Any], index_dim: int, basis: str, seed: int, projected: Dict[str, Any]) -> Dict[str, Any]:
    """What every index depends on, and what a query checks before it trusts one."""
    return {**train_provenance, "index_dim": index_dim, "basis": basis, "seed": seed, **projected}


def factor_record(
    output_dir: str | Path, analysis_name: str, seed: int, strategy: str, train_provenance: Dict[str, Any], hint: str, half: bool = False
) -> Tuple[Optional[Dict[str, Any]], Path]:
    """The run_config.json record of analyze.py's factors of `strategy` (float32, or bfloat16 with `half`;
    None if there are none) and their folder, checked to be of this model, these training images and this seed."""
    directory = naming.factors_dir(output_dir, analysis_name, naming.factors_name(strategy, half))
    record_path = directory / naming.RUN_CONFIG_FILE
    if not record_path.is_file():
        return None, directory
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        raise UserError(f"{record_path} cannot be read: {hint}") from None
    saved = record.get("depends_on", {})
    # The seed too, as analyze.py checks it: it draws the true-Fisher labels the factors were fitted with
    # (and, with --weights none, the model itself).
    changed = [key for key, value in {**train_provenance, "seed": seed}.items() if saved.get(key) != value]
    check_same_arch(recorded_arch(record), split_model_source(train_provenance["model"])[0], f"the factors in {directory}")
    if changed:
        raise UserError(f"the factors in {directory} were fitted with another model, other images or another seed ({', '.join(changed)} differ): {hint}")
    return record, directory


def load_factors(
    analyzer: Any, output_dir: str | Path, analysis_name: str, seed: int, strategy: str, train_provenance: Dict[str, Any], half: bool = False
) -> Tuple[Optional[Dict[str, Any]], FactorArguments, Dict[str, Any]]:
    """analyze.py's fitted factors of --factor_strategy (record, kronfluence's arguments, the factors; the
    --use_half_precision ones with `half`), checked to be of this model and these training images;
    identity needs none."""
    name = naming.factors_name(strategy, half)
    hint = f"run `analyze.py --factor_strategy {strategy}{HALF_FLAG if half else ''}` with the same --dataset_dir, model and --output_dir/--analysis_name first"
    record, directory = factor_record(output_dir, analysis_name, seed, strategy, train_provenance, hint, half)
    if record is None:
        if strategy == "identity":
            return None, FactorArguments(strategy="identity"), {}
        raise UserError(f"no {strategy} factors in {directory}: {hint}")
    try:
        factor_args = analyzer.load_factor_args(name)
        factors = analyzer.load_all_factors(name)
    except (FileNotFoundError, FactorsNotFoundError):
        raise UserError(f"the factors in {directory} are unfinished: {hint}") from None
    return record, factor_args, factors
