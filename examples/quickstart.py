"""Quickstart: publish a fine-tuned adapter as a deployment, make a key, call it.

Run it next to a running Lorry (e.g. in the directory where `lorry up` runs: the CLI's
credentials in ./.lorry/ are used; or set LORRY_TOKEN and LORRY_CLOUD_API_URL):

    python examples/quickstart.py --job-id <job id>          # a job with a final adapter
    LORRY_JOB_ID=<job id> python examples/quickstart.py
    python examples/quickstart.py --import-dir /srv/lorry/imports/my-run   # a PEFT output
                                                                          # directory on the server

It creates a deployment (API keys required, `authMode: fixed_api_key`) serving the job's final
adapter, creates a key, prints the deployment's base URL and the key's plaintext (shown once:
store it now), and asks the deployment one question with the `openai` SDK.

The org and project come from the credentials, else LORRY_ORG / LORRY_PROJECT, else "default".
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time

import openai

import lorry


def scope_of(credentials: lorry.Credentials) -> lorry.DeploymentScope:
    return lorry.DeploymentScope(
        org_slug=credentials.org_slug or os.environ.get("LORRY_ORG", "default"),
        project_slug=credentials.project_slug or os.environ.get("LORRY_PROJECT", "default"),
    )


def ask(base_url: str, key: str, question: str) -> str:
    """One chat completion. A new deployment reaches every gateway within moments (change feed),
    so a 404 right after creating it is retried briefly."""
    client = openai.OpenAI(base_url=base_url, api_key=key)
    deadline = time.monotonic() + 15.0
    while True:
        try:
            reply = client.chat.completions.create(
                model="quickstart",  # any name: the deployment decides the model
                messages=[{"role": "user", "content": question}],
                max_tokens=32,
            )
            return reply.choices[0].message.content or ""
        except openai.NotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--job-id", default=os.environ.get("LORRY_JOB_ID"), help="a job with a final adapter")
    source.add_argument(
        "--import-dir", help="a PEFT output directory on the server, under LORRY_IMPORT_ROOTS"
    )
    parser.add_argument("--slug", default=f"quickstart-{secrets.token_hex(3)}", help="the deployment's name")
    parser.add_argument("--question", default="Hello! Who are you?")
    args = parser.parse_args()

    credentials = lorry.ensure_credentials()
    scope = scope_of(credentials)
    with lorry.CloudApiClient(credentials=credentials) as client:
        if args.import_dir:
            job = client.import_job(scope, name=args.slug, path=args.import_dir)
            print(f"Job:        {job.id} (imported from {args.import_dir})")
        elif args.job_id:
            job = client.get_job(args.job_id, scope)
            print(f"Job:        {job.id} ({job.name})")
        else:
            parser.error("give --job-id (or LORRY_JOB_ID) or --import-dir")

        deployment = client.create_deployment(
            scope,
            slug=args.slug,
            target={"kind": "adapter", "adapter": {"kind": "final", "jobId": job.id}},
            auth_mode="fixed_api_key",
        )
        key = client.create_deployment_key(deployment.id, scope, label="quickstart")

    base_url = deployment.base_url or ""
    print(f"Deployment: {deployment.slug} ({deployment.id})")
    print(f"Base URL:   {base_url}")
    print(f"Key:        {key.plaintext}")
    print(f"Reply:      {ask(base_url, key.plaintext, args.question)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
