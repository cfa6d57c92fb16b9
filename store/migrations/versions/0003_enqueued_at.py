"""outbox mark: jobs.enqueued_at

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 20:20:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
    # rows queued before the mark existed were sent when they were created
    op.execute("UPDATE jobs SET enqueued_at = created_at WHERE state = 'queued'")


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')
