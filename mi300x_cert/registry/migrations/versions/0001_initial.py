"""Initial schema: hosts, keys, certifications, card_results, failed_expectations, serials, alerts,
alert_events (as ``mi300x_cert/registry/schema.py`` describes them).

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

__all__ = ["revision", "down_revision", "branch_labels", "depends_on", "upgrade", "downgrade"]

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('alerts',
    sa.Column('id', sa.String(length=250), nullable=False),
    sa.Column('host', sa.String(length=200), nullable=False),
    sa.Column('run_id', sa.String(length=250), nullable=False),
    sa.Column('dag_id', sa.String(length=250), nullable=True),
    sa.Column('suite', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('severity', sa.String(length=16), nullable=False),
    sa.Column('created', sa.String(length=32), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('failures', sa.JSON(), nullable=False),
    sa.Column('report', sa.Text(), nullable=True),
    sa.Column('data_docs', sa.Text(), nullable=True),
    sa.Column('bundle_uri', sa.Text(), nullable=True),
    sa.Column('certification_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('acknowledged_by', sa.String(length=200), nullable=True),
    sa.Column('acknowledged_at', sa.String(length=32), nullable=True),
    sa.Column('note', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alerts')),
    sa.UniqueConstraint('host', 'run_id', 'suite', 'kind', name=op.f('uq_alerts_host_run_id_suite_kind'))
    )
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alerts_created'), ['created'], unique=False)
        batch_op.create_index(batch_op.f('ix_alerts_status_host'), ['status', 'host'], unique=False)

    op.create_table('hosts',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('sku', sa.String(length=100), nullable=True),
    sa.Column('profile', sa.String(length=200), nullable=True),
    sa.Column('cards', sa.Integer(), nullable=True),
    sa.Column('valid_days', sa.Integer(), nullable=True),
    sa.Column('first_seen', sa.String(length=32), nullable=False),
    sa.Column('last_seen', sa.String(length=32), nullable=False),
    sa.Column('last_certification_id', sa.Integer(), nullable=True),
    sa.Column('last_certified_id', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_hosts'))
    )
    op.create_table('alert_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('alert_id', sa.String(length=250), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('by', sa.String(length=200), nullable=True),
    sa.Column('at', sa.String(length=32), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['alert_id'], ['alerts.id'], name=op.f('fk_alert_events_alert_id_alerts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alert_events'))
    )
    with op.batch_alter_table('alert_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alert_events_alert_id'), ['alert_id'], unique=False)

    op.create_table('certifications',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('host', sa.String(length=200), nullable=False),
    sa.Column('run_id', sa.String(length=250), nullable=False),
    sa.Column('profile', sa.String(length=200), nullable=True),
    sa.Column('sku', sa.String(length=100), nullable=True),
    sa.Column('path', sa.String(length=32), nullable=True),
    sa.Column('started', sa.String(length=32), nullable=True),
    sa.Column('finished', sa.String(length=32), nullable=True),
    sa.Column('registered_at', sa.String(length=32), nullable=False),
    sa.Column('result', sa.String(length=16), nullable=False),
    sa.Column('certified', sa.Boolean(), nullable=False),
    sa.Column('reasons', sa.JSON(), nullable=False),
    sa.Column('verdicts', sa.JSON(), nullable=False),
    sa.Column('bundle_uri', sa.Text(), nullable=True),
    sa.Column('bundle_digest', sa.String(length=80), nullable=True),
    sa.Column('signer_keyid', sa.String(length=128), nullable=True),
    sa.Column('trusted', sa.Boolean(), nullable=False),
    sa.Column('expires_at', sa.String(length=32), nullable=True),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('dag_id', sa.String(length=250), nullable=True),
    sa.Column('report', sa.Text(), nullable=True),
    sa.Column('data_docs', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['host'], ['hosts.name'], name=op.f('fk_certifications_host_hosts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_certifications')),
    sa.UniqueConstraint('host', 'run_id', name=op.f('uq_certifications_host_run_id'))
    )
    with op.batch_alter_table('certifications', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_certifications_host_registered_at'), ['host', 'registered_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_certifications_registered_at'), ['registered_at'], unique=False)

    op.create_table('keys',
    sa.Column('keyid', sa.String(length=128), nullable=False),
    sa.Column('host', sa.String(length=200), nullable=False),
    sa.Column('public_pem', sa.Text(), nullable=False),
    sa.Column('scheme', sa.String(length=64), nullable=False),
    sa.Column('enrolled_at', sa.String(length=32), nullable=False),
    sa.Column('enrolled_by', sa.String(length=200), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('revoked_at', sa.String(length=32), nullable=True),
    sa.Column('revoked_by', sa.String(length=200), nullable=True),
    sa.Column('revoke_reason', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['host'], ['hosts.name'], name=op.f('fk_keys_host_hosts')),
    sa.PrimaryKeyConstraint('keyid', name=op.f('pk_keys'))
    )
    with op.batch_alter_table('keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_keys_host'), ['host'], unique=False)

    op.create_table('card_results',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('certification_id', sa.Integer(), nullable=False),
    sa.Column('host', sa.String(length=200), nullable=False),
    sa.Column('run_id', sa.String(length=250), nullable=False),
    sa.Column('sku', sa.String(length=100), nullable=True),
    sa.Column('serial', sa.String(length=200), nullable=True),
    sa.Column('card', sa.Integer(), nullable=True),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('bus_id', sa.String(length=64), nullable=True),
    sa.Column('date', sa.String(length=32), nullable=True),
    sa.Column('idle_junction_mean_c', sa.Float(), nullable=True),
    sa.Column('active_junction_p95_c', sa.Float(), nullable=True),
    sa.Column('memory_max_c', sa.Float(), nullable=True),
    sa.Column('active_power_mean_w', sa.Float(), nullable=True),
    sa.Column('sd_per_image_median_s', sa.Float(), nullable=True),
    sa.Column('sd_batches', sa.Integer(), nullable=True),
    sa.Column('card_ok', sa.Boolean(), nullable=True),
    sa.Column('failures', sa.JSON(), nullable=False),
    sa.Column('drift', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['certification_id'], ['certifications.id'], name=op.f('fk_card_results_certification_id_certifications')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_card_results'))
    )
    with op.batch_alter_table('card_results', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_card_results_certification_id'), ['certification_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_card_results_serial_date'), ['serial', 'date'], unique=False)

    op.create_table('failed_expectations',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('certification_id', sa.Integer(), nullable=False),
    sa.Column('suite', sa.String(length=100), nullable=True),
    sa.Column('expectation', sa.String(length=250), nullable=True),
    sa.Column('column', sa.String(length=250), nullable=True),
    sa.Column('card', sa.Integer(), nullable=True),
    sa.Column('observed', sa.JSON(), nullable=True),
    sa.Column('expected', sa.JSON(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['certification_id'], ['certifications.id'], name=op.f('fk_failed_expectations_certification_id_certifications')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_failed_expectations'))
    )
    with op.batch_alter_table('failed_expectations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_failed_expectations_certification_id'), ['certification_id'], unique=False)

    op.create_table('serials',
    sa.Column('serial', sa.String(length=200), nullable=False),
    sa.Column('sku', sa.String(length=100), nullable=True),
    sa.Column('runs', sa.Integer(), nullable=False),
    sa.Column('last_card_result_id', sa.Integer(), nullable=False),
    sa.Column('last_date', sa.String(length=32), nullable=True),
    sa.ForeignKeyConstraint(['last_card_result_id'], ['card_results.id'], name=op.f('fk_serials_last_card_result_id_card_results')),
    sa.PrimaryKeyConstraint('serial', name=op.f('pk_serials'))
    )
    with op.batch_alter_table('serials', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_serials_sku'), ['sku'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('serials', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_serials_sku'))

    op.drop_table('serials')
    with op.batch_alter_table('failed_expectations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_failed_expectations_certification_id'))

    op.drop_table('failed_expectations')
    with op.batch_alter_table('card_results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_card_results_serial_date'))
        batch_op.drop_index(batch_op.f('ix_card_results_certification_id'))

    op.drop_table('card_results')
    with op.batch_alter_table('keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_keys_host'))

    op.drop_table('keys')
    with op.batch_alter_table('certifications', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_certifications_registered_at'))
        batch_op.drop_index(batch_op.f('ix_certifications_host_registered_at'))

    op.drop_table('certifications')
    with op.batch_alter_table('alert_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alert_events_alert_id'))

    op.drop_table('alert_events')
    op.drop_table('hosts')
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alerts_status_host'))
        batch_op.drop_index(batch_op.f('ix_alerts_created'))

    op.drop_table('alerts')
