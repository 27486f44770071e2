"""`infermesh pipeline`: the pipeline file (docs/pipelines.md).

infermesh pipeline check FILE   the checks `infermesh up --pipeline FILE` and every service
                                run at start, without starting anything

Also what `infermesh up` serves a pipeline's own data with (its `data` section): the files
it ingests into the views and its model repository.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.service import GatewaySettings, scored_model
from infermesh.cli_help import CommandParser
from infermesh.settings import features_settings, model_repository
from services.features.pipeline_views import checked_layout, pipeline_registry, view_columns
from services.ranking.service import RankingSettings, pipeline_settings
from services.runtime.pipeline import IngestSpec, PipelineError, PipelineFile, load_pipeline
from services.runtime.redis_connection import RedisTarget
from services.scoring.pipeline_models import check_models


def check_pipeline(path: str | Path | None, repository: Path | None, require_all: bool = True) -> PipelineFile:
    """The pipeline at `path` (None: the demo) checked as every service checks it, its models
    against `repository` too when given (those it holds only, unless `require_all`); PipelineError."""
    return check_loaded(load_pipeline(path), repository, require_all)


def check_loaded(pipeline: PipelineFile, repository: Path | None, require_all: bool = True) -> PipelineFile:
    """check_pipeline for a pipeline file already loaded."""
    registry, _ = checked_layout(pipeline, features_settings()[0])  # columns resolved as features resolves them
    problems = [
        (f"data.ingest[{i}].view", f"no view {entry.view!r}; the views: {', '.join(sorted(registry.views))}")
        for i, entry in enumerate(ingest_entries(pipeline))
        if entry.view not in registry.views
    ]
    if problems:
        raise pipeline.error(problems)
    scored_model(GatewaySettings(), pipeline)
    pipeline_settings(RankingSettings(), pipeline)  # the chain as ranking builds it
    if repository is not None:
        check_models(pipeline, repository, view_columns(registry), require_all)
    return pipeline


def ingest_entries(pipeline: PipelineFile) -> list[IngestSpec]:
    """The files the pipeline's `data.ingest` loads into its views; none without `data`."""
    return pipeline.spec.data.ingest if pipeline.spec.data is not None else []


def data_repository(pipeline: PipelineFile) -> Path | None:
    """The model repository the pipeline's `data` section names; None: the demo's."""
    data = pipeline.spec.data
    return pipeline.resolve(data.model_repository) if data is not None else None


def ingest_data(pipeline: PipelineFile, redis: RedisTarget, namespace: str, progress: bool = False) -> list[str]:
    """Each file of the pipeline's `data.ingest` into its view, as `infermesh features ingest`
    loads one (a new materialization, switched atomically; the previous one removed), and
    the report of each; IngestError naming the file when one fails."""
    from infermesh.features.ingest import IngestError, format_report, ingest

    registry = pipeline_registry(pipeline, features_settings()[0])
    reports = []
    with redis.client(socket_connect_timeout=5, socket_timeout=60) as client:
        for i, entry in enumerate(ingest_entries(pipeline)):
            path = pipeline.resolve(entry.file)
            if not path.is_file():
                raise IngestError(
                    f"{pipeline.path}: data.ingest[{i}].file: no file {path}; run the data generator first"
                )
            report = ingest(client, registry, entry.view, path, namespace=namespace, progress=progress)
            reports.append(format_report(report))
    return reports


def summary(pipeline: PipelineFile) -> str:
    spec = pipeline.spec
    models = ", ".join(f"{m.name} ({', '.join(i.name for i in m.inputs)})" for m in spec.models)
    stages = ", ".join(s.stage for s in spec.ranking.stages) or "none"
    return f"{pipeline.path}: pipeline {spec.name!r} is valid: models {models}; ranking stages {stages}"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="infermesh pipeline", description=(__doc__ or "").splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check a pipeline file against its views and model repository")
    check.add_argument("file", type=Path, help="the pipeline file (YAML)")
    check.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help=(
            "the model repository its models are read from (default: the pipeline's data.model_repository, "
            "else $SCORING_MODEL_REPOSITORY or its default)"
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # --model-repository, else the pipeline's own (its `data` section), else the demo's.
        loaded = load_pipeline(args.file)
        own = data_repository(loaded)
        repository = args.model_repository or own or Path(model_repository())
        if repository == own and not own.is_dir():  # the file's own claim, not a default
            raise loaded.error([("data.model_repository", f"no directory {own} (write the models there first)")])
        if not repository.is_dir():
            pipeline = check_loaded(loaded, None)
            print(f"note: models not checked: no model repository at {repository} (--model-repository)")
        else:
            pipeline = check_loaded(loaded, repository)
    except PipelineError as error:
        print(error, file=sys.stderr)
        return 1
    for note in missing_data_files(pipeline):
        print(f"note: {note}")
    print(summary(pipeline))
    return 0


def missing_data_files(pipeline: PipelineFile) -> list[str]:
    """data.ingest files not there (yet): `up` refuses to start without them."""
    return [
        f"data.ingest[{i}].file: no file {pipeline.resolve(entry.file)} yet; `infermesh up` needs it"
        for i, entry in enumerate(ingest_entries(pipeline))
        if not pipeline.resolve(entry.file).is_file()
    ]


if __name__ == "__main__":
    sys.exit(main())
