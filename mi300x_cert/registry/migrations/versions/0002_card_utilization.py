"""card_results.utilization: each workload's achieved rate on the card as a fraction of the run's
measured ceiling (``stats/utilization.json``); NULL for certifications registered before.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

__all__ = ["revision", "down_revision", "branch_labels", "depends_on", "upgrade", "downgrade"]

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('card_results') as batch:
        batch.add_column(sa.Column('utilization', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('card_results') as batch:
        batch.drop_column('utilization')
