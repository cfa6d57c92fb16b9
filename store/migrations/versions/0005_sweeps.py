"""sweeps: a grid of jobs submitted at once; jobs.sweep_id

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 01:20:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'sweeps',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('tenant_id', sa.String(length=64), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=True),
        sa.Column('spec', sa.JSON(), nullable=False),
        sa.Column('children', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('sweeps', schema=None) as batch_op:
        batch_op.create_index('ix_sweeps_tenant_id', ['tenant_id'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sweep_id', sa.String(length=36), nullable=True))
        batch_op.create_index('ix_jobs_sweep_id', ['sweep_id'], unique=False)
        batch_op.create_foreign_key('fk_jobs_sweep_id', 'sweeps', ['sweep_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_jobs_sweep_id', type_='foreignkey')
        batch_op.drop_index('ix_jobs_sweep_id')
        batch_op.drop_column('sweep_id')
    with op.batch_alter_table('sweeps', schema=None) as batch_op:
        batch_op.drop_index('ix_sweeps_tenant_id')
    op.drop_table('sweeps')
