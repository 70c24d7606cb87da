-- The fleet database's schema as edgekit created it before migrations existed (commit
-- c0dff34, schema_info version 1): the DDL that Base.metadata.create_all emitted on postgresql.
-- tests/host/test_db_migrations.py builds an old database from it and upgrades it.

CREATE TABLE devices (
	id SERIAL NOT NULL,
	fleet VARCHAR(128) NOT NULL,
	device_id VARCHAR(128) NOT NULL,
	online BOOLEAN NOT NULL,
	session_seq BIGINT NOT NULL,
	agent_version VARCHAR(64),
	model_name VARCHAR(128),
	model_version VARCHAR(64),
	model_sha256 VARCHAR(64),
	first_seen TIMESTAMP WITH TIME ZONE NOT NULL,
	last_seen TIMESTAMP WITH TIME ZONE,
	status JSONB,
	latency_p50_ms FLOAT,
	latency_p95_ms FLOAT,
	latency_p99_ms FLOAT,
	accuracy FLOAT,
	f1 FLOAT,
	label_count BIGINT,
	metrics_at TIMESTAMP WITH TIME ZONE,
	metrics_session BIGINT,
	metrics_seq BIGINT,
	PRIMARY KEY (id),
	CONSTRAINT uq_devices_fleet_device UNIQUE (fleet, device_id)
);

CREATE TABLE leases (
	name VARCHAR(200) NOT NULL,
	owner VARCHAR(128) NOT NULL,
	expires TIMESTAMP WITH TIME ZONE NOT NULL,
	acquired TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (name)
);

CREATE TABLE metrics (
	id BIGSERIAL NOT NULL,
	fleet VARCHAR(128) NOT NULL,
	device_id VARCHAR(128) NOT NULL,
	session BIGINT NOT NULL,
	seq BIGINT NOT NULL,
	ts TIMESTAMP WITH TIME ZONE NOT NULL,
	received TIMESTAMP WITH TIME ZONE NOT NULL,
	payload JSONB NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT uq_metrics_message UNIQUE (fleet, device_id, session, seq)
);

CREATE INDEX ix_metrics_fleet_ts ON metrics (fleet, ts);

CREATE TABLE model_channels (
	name VARCHAR(128) NOT NULL,
	channel VARCHAR(64) NOT NULL,
	version VARCHAR(64) NOT NULL,
	promoted TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (name, channel)
);

CREATE TABLE models (
	id SERIAL NOT NULL,
	name VARCHAR(128) NOT NULL,
	version VARCHAR(64) NOT NULL,
	sha256 VARCHAR(64) NOT NULL,
	size BIGINT NOT NULL,
	format VARCHAR(16) NOT NULL,
	task VARCHAR(32) NOT NULL,
	path TEXT NOT NULL,
	manifest JSONB NOT NULL,
	evaluation JSONB,
	signed BOOLEAN NOT NULL,
	signature_verified BOOLEAN NOT NULL,
	key_id VARCHAR(64),
	parent VARCHAR(200),
	recipe JSONB,
	data TEXT,
	created TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT uq_models_name_version UNIQUE (name, version)
);

CREATE TABLE rollouts (
	id SERIAL NOT NULL,
	fleet VARCHAR(128) NOT NULL,
	model_name VARCHAR(128) NOT NULL,
	model_version VARCHAR(64) NOT NULL,
	state VARCHAR(16) NOT NULL,
	plan JSONB NOT NULL,
	current_wave INTEGER NOT NULL,
	owner VARCHAR(128),
	lease_expires TIMESTAMP WITH TIME ZONE,
	reason TEXT,
	created TIMESTAMP WITH TIME ZONE NOT NULL,
	updated TIMESTAMP WITH TIME ZONE NOT NULL,
	finished TIMESTAMP WITH TIME ZONE,
	PRIMARY KEY (id)
);

CREATE UNIQUE INDEX uq_rollouts_active_fleet ON rollouts (fleet) WHERE state IN ('aborting', 'paused', 'pending', 'running');

CREATE TABLE samples (
	id BIGSERIAL NOT NULL,
	fleet VARCHAR(128) NOT NULL,
	device_id VARCHAR(128) NOT NULL,
	prediction_id VARCHAR(128) NOT NULL,
	row INTEGER NOT NULL,
	model_name VARCHAR(128),
	model_version VARCHAR(64),
	ts TIMESTAMP WITH TIME ZONE NOT NULL,
	inputs BYTEA NOT NULL,
	label JSONB,
	prediction JSONB,
	PRIMARY KEY (id),
	CONSTRAINT uq_samples_prediction_row UNIQUE (fleet, device_id, prediction_id, row)
);

CREATE INDEX ix_samples_ts ON samples (ts);

CREATE TABLE schema_info (
	id SERIAL NOT NULL,
	version INTEGER NOT NULL,
	created TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (id)
);

CREATE TABLE events (
	id BIGSERIAL NOT NULL,
	fleet VARCHAR(128) NOT NULL,
	device_id VARCHAR(128),
	seq BIGINT,
	kind VARCHAR(64) NOT NULL,
	level VARCHAR(16) NOT NULL,
	reason VARCHAR(64),
	message TEXT NOT NULL,
	data JSONB,
	ts TIMESTAMP WITH TIME ZONE NOT NULL,
	rollout_id INTEGER,
	PRIMARY KEY (id),
	CONSTRAINT uq_events_device_seq UNIQUE (fleet, device_id, seq),
	FOREIGN KEY(rollout_id) REFERENCES rollouts (id) ON DELETE SET NULL
);

CREATE INDEX ix_events_fleet_id ON events (fleet, id);

CREATE TABLE rollout_targets (
	rollout_id INTEGER NOT NULL,
	device_id VARCHAR(128) NOT NULL,
	wave INTEGER,
	state VARCHAR(16) NOT NULL,
	reason TEXT,
	previous_version VARCHAR(64),
	assigned_at TIMESTAMP WITH TIME ZONE,
	updated TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (rollout_id, device_id),
	FOREIGN KEY(rollout_id) REFERENCES rollouts (id) ON DELETE CASCADE
);
