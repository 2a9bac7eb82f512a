"""Getting requests onto the queues: check, route, commit, then publish; limits; the services
every process that submits builds once."""
