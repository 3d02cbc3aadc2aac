"""One chat node: the aiohttp app, the Socket.IO rooms, the embedded store."""
