"""CI: publish a fine-tuning run's adapter and make it live, in one step.

A pipeline step after training: upload the output archive (a `.tar.gz` of one PEFT LoRA adapter:
`adapter_config.json` + `adapter_model.safetensors`, at the root or in one top-level folder) as a
new job's final adapter, then point the deployment at it — created on the first run, and on
later runs updated in place (PATCH of its target): the same base URL, the same API keys, the new
weights.

    export LORRY_TOKEN=lorry_admin_…  LORRY_CLOUD_API_URL=https://admin.lorry.example.com
    python examples/ci_publish.py output/adapter.tar.gz --slug support-bot --model meta-llama/Llama-3.1-8B

`--model` (else LORRY_BASE_MODEL) is the base model the adapter was trained on. The org and
project come from the credentials, else LORRY_ORG / LORRY_PROJECT, else "default". A new
deployment has no key yet: create one once with `lorry deployments keys create <slug>` and keep
it in your secret store. The last line printed is the base URL.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import lorry


def scope_of(credentials: lorry.Credentials) -> lorry.DeploymentScope:
    return lorry.DeploymentScope(
        org_slug=credentials.org_slug or os.environ.get("LORRY_ORG", "default"),
        project_slug=credentials.project_slug or os.environ.get("LORRY_PROJECT", "default"),
    )


def job_name(slug: str) -> str:
    """`<slug>-<commit>` in CI (GitHub Actions, GitLab CI), else `<slug>-<UTC time>`."""
    commit = os.environ.get("GITHUB_SHA") or os.environ.get("CI_COMMIT_SHA") or ""
    suffix = commit[:12] if commit else datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{slug}-{suffix}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("archive", type=Path, help="the adapter archive (.tar.gz)")
    parser.add_argument("--slug", required=True, help="the deployment to publish to")
    parser.add_argument("--model", default=os.environ.get("LORRY_BASE_MODEL"), help="the base model id")
    args = parser.parse_args()
    if not args.model:
        parser.error("give --model or set LORRY_BASE_MODEL")
    if not args.archive.name.endswith(".tar.gz"):
        parser.error(f"{args.archive} is not a .tar.gz archive")

    credentials = lorry.ensure_credentials()
    scope = scope_of(credentials)
    with lorry.CloudApiClient(credentials=credentials, timeout=600.0) as client:
        job = client.create_job(scope, name=job_name(args.slug), model=args.model)
        uploaded = client.upload_artifact(job.id, scope, args.archive, kind="final")
        print(f"Job:        {job.id} (adapter {uploaded.adapter.digest[:12]}, rank {uploaded.adapter.rank})")

        target = {"kind": "adapter", "adapter": {"kind": "final", "jobId": job.id}}
        existing = [d for d in client.list_deployments(scope) if d.slug == args.slug]
        if existing:
            deployment = client.update_deployment(existing[0].id, scope, target=target)
            print(f"Deployment: {deployment.slug} updated ({deployment.id})")
        else:
            deployment = client.create_deployment(
                scope, slug=args.slug, target=target, auth_mode="fixed_api_key"
            )
            print(f"Deployment: {deployment.slug} created ({deployment.id})")
            print(f"            no key yet: lorry deployments keys create {deployment.slug}")

    print(f"Base URL:   {deployment.base_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
