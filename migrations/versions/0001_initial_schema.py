"""initial schema

Revision ID: 0001
Revises: 
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql
import lorry.db.types

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('org_id', sa.String(length=36), nullable=True),
    sa.Column('actor_token_id', sa.String(length=36), nullable=True),
    sa.Column('action', sa.String(length=60), nullable=False),
    sa.Column('resource_type', sa.String(length=40), nullable=False),
    sa.Column('resource_id', sa.String(length=36), nullable=False),
    sa.Column('details', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', lorry.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_action'), ['action'], unique=False)
        batch_op.create_index('ix_audit_events_org_id_created_at', ['org_id', 'created_at'], unique=False)

    op.create_table('change_counter',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_change_counter'))
    )
    op.bulk_insert(sa.table('change_counter', sa.column('id', sa.Integer()), sa.column('value', sa.BigInteger())),
                   [{'id': 1, 'value': 0}])
    op.create_table('change_log',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.Column('kind', sa.String(length=40), nullable=False),
    sa.Column('resource_id', sa.String(length=36), nullable=False),
    sa.Column('created_at', lorry.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_change_log'))
    )
    with op.batch_alter_table('change_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_change_log_created_at'), ['created_at'], unique=False)

    op.create_table('engines',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('url', sa.String(length=500), nullable=False),
    sa.Column('base_model', sa.String(length=300), nullable=False),
    sa.Column('served_model_name', sa.String(length=300), nullable=False),
    sa.Column('adapter_root', sa.String(length=500), nullable=False),
    sa.Column('max_loras', sa.Integer(), nullable=False),
    sa.Column('max_cpu_loras', sa.Integer(), nullable=True),
    sa.Column('max_lora_rank', sa.Integer(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('api_key', sa.String(length=500), nullable=True),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('created_at', lorry.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', lorry.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_engines')),
    sa.UniqueConstraint('name', name=op.f('uq_engines_name'))
    )
    with op.batch_alter_table('engines', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_engines_base_model'), ['base_model'], unique=False)

    op.create_table('organizations',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('slug', sa.String(length=50), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('created_at', lorry.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_organizations')),
    sa.UniqueConstraint('slug', name=op.f('uq_organizations_slug'))
    )
    op.create_table('admin_tokens',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('org_id', sa.String(length=36), nullable=True),
    sa.Column('kid', sa.String(length=12), nullable=False),
    sa.Column('secret_hash', sa.String(length=200), nullable=False),
    sa.Column('label', sa.String(length=80), nullable=False),
    sa.Column('prefix', sa.String(length=40), nullable=False),
    sa.Column('created_at', lorry.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', lorry.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('expires_at', lorry.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', lorry.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('rolled_from', sa.String(length=36), nullable=True),
    sa.CheckConstraint("(kind = 'org') = (org_id IS NOT NULL)", name=op.f('ck_admin_tokens_org_scope')),
    sa.CheckConstraint("kind IN ('install', 'org')", name=op.f('ck_admin_tokens_kind')),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], name=op.f('fk_admin_tokens_org_id_organizations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_admin_tokens')),
    sa.UniqueConstraint('kid', name=op.f('uq_admin_tokens_kid'))
    )
    with op.batch_alter_table('admin_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_admin_tokens_org_id'), ['org_id'], unique=False)

    op.create_table('projects',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('org_id', sa.String(length=36), nullable=False),
    sa.Column('slug', sa.String(length=50), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('created_at', lorry.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], name=op.f('fk_projects_org_id_organizations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_projects')),
    sa.UniqueConstraint('org_id', 'slug', name=op.f('uq_projects_org_id_slug'))
    )
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_projects_org_id'), ['org_id'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('org_id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('model', sa.String(length=300), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', lorry.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('started_at', lorry.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('completed_at', lorry.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], name=op.f('fk_jobs_org_id_organizations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_jobs_project_id_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_org_id'), ['org_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_project_id'), ['project_id'], unique=False)

    op.create_table('adapters',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('step', sa.Integer(), nullable=True),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('target_modules', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('base_model', sa.String(length=300), nullable=True),
    sa.Column('created_at', lorry.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind = 'final' OR step IS NOT NULL", name=op.f('ck_adapters_checkpoint_step')),
    sa.CheckConstraint("kind IN ('final', 'checkpoint')", name=op.f('ck_adapters_kind')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_adapters_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapters'))
    )
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapters_digest'), ['digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapters_job_id'), ['job_id'], unique=False)
        batch_op.create_index('uq_adapters_job_checkpoint_step', ['job_id', 'step'], unique=True, postgresql_where=sa.text("kind = 'checkpoint'"), sqlite_where=sa.text("kind = 'checkpoint'"))
        batch_op.create_index('uq_adapters_job_final', ['job_id'], unique=True, postgresql_where=sa.text("kind = 'final'"), sqlite_where=sa.text("kind = 'final'"))

    op.create_table('deployments',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('org_id', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=36), nullable=False),
    sa.Column('slug', sa.String(length=50), nullable=False),
    sa.Column('target', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('target_kind', sa.String(length=16), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=True),
    sa.Column('adapter_id', sa.String(length=36), nullable=True),
    sa.Column('base_model', sa.String(length=300), nullable=True),
    sa.Column('auth_mode', sa.String(length=16), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('run_retention_mode', sa.String(length=16), nullable=False),
    sa.Column('run_retention_days', sa.Integer(), nullable=True),
    sa.Column('created_at', lorry.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', lorry.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('deleted_at', lorry.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.CheckConstraint("auth_mode IN ('fixed_api_key', 'none')", name=op.f('ck_deployments_auth_mode')),
    sa.CheckConstraint("target_kind IN ('adapter', 'base_model')", name=op.f('ck_deployments_target_kind')),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_deployments_adapter_id_adapters'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_deployments_job_id_jobs'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], name=op.f('fk_deployments_org_id_organizations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_deployments_project_id_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deployments')),
    sa.UniqueConstraint('slug', name=op.f('uq_deployments_slug'))
    )
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deployments_adapter_id'), ['adapter_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_deployments_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_deployments_org_id'), ['org_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_deployments_project_id'), ['project_id'], unique=False)

    op.create_table('deployment_keys',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('deployment_id', sa.String(length=36), nullable=False),
    sa.Column('kid', sa.String(length=12), nullable=False),
    sa.Column('secret_hash', sa.String(length=200), nullable=False),
    sa.Column('label', sa.String(length=80), nullable=False),
    sa.Column('prefix', sa.String(length=40), nullable=False),
    sa.Column('created_at', lorry.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', lorry.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('expires_at', lorry.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', lorry.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('rolled_from', sa.String(length=36), nullable=True),
    sa.ForeignKeyConstraint(['deployment_id'], ['deployments.id'], name=op.f('fk_deployment_keys_deployment_id_deployments'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deployment_keys')),
    sa.UniqueConstraint('kid', name=op.f('uq_deployment_keys_kid'))
    )
    with op.batch_alter_table('deployment_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deployment_keys_deployment_id'), ['deployment_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('deployment_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deployment_keys_deployment_id'))

    op.drop_table('deployment_keys')
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deployments_project_id'))
        batch_op.drop_index(batch_op.f('ix_deployments_org_id'))
        batch_op.drop_index(batch_op.f('ix_deployments_job_id'))
        batch_op.drop_index(batch_op.f('ix_deployments_adapter_id'))

    op.drop_table('deployments')
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_index('uq_adapters_job_final', postgresql_where=sa.text("kind = 'final'"), sqlite_where=sa.text("kind = 'final'"))
        batch_op.drop_index('uq_adapters_job_checkpoint_step', postgresql_where=sa.text("kind = 'checkpoint'"), sqlite_where=sa.text("kind = 'checkpoint'"))
        batch_op.drop_index(batch_op.f('ix_adapters_job_id'))
        batch_op.drop_index(batch_op.f('ix_adapters_digest'))

    op.drop_table('adapters')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_project_id'))
        batch_op.drop_index(batch_op.f('ix_jobs_org_id'))

    op.drop_table('jobs')
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_projects_org_id'))

    op.drop_table('projects')
    with op.batch_alter_table('admin_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_admin_tokens_org_id'))

    op.drop_table('admin_tokens')
    op.drop_table('organizations')
    with op.batch_alter_table('engines', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_engines_base_model'))

    op.drop_table('engines')
    with op.batch_alter_table('change_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_change_log_created_at'))

    op.drop_table('change_log')
    op.drop_table('change_counter')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_org_id_created_at')
        batch_op.drop_index(batch_op.f('ix_audit_events_action'))

    op.drop_table('audit_events')
