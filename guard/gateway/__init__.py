"""The gateway: an OpenAI-compatible server in front of a teacher, per account. `app.create_app` assembles it from
the modules here: the wire schema (`api`), keys and callers (`auth`), tiers (`policies`), rate limits (`limits`),
the audit row and its charge (`billing`), checks (`validation`), generation, streams (`streaming`), middleware,
the routes, the stores (`store`, `group_commit`), Redis shared by replicas (`shared_state`) and the admin API."""
