"""The aiohttp application: routes by area, auth middleware, JSON errors."""
