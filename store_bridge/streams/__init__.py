"""The live loop's streams: events and served impressions in Redis Streams, and their consumers.

`stream.RedisStream` is a bounded stream of record batches with consumer groups, per-event
dedup and lag counters; `consumer.StreamConsumer` is the loop every role runs; `histories`
keeps each user's recent events in Redis for the FM serving tier.
"""
