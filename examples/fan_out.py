"""Fan-out with child runs: a photo album resized as one child run per photo, then cancelled.

    python examples/fan_out.py

``ctx.run`` starts a child run and waits for it durably: the parent is suspended meanwhile and
holds no worker slot, and a parent that crashes mid-fan-out finds the children it already
started instead of starting them again. Cancelling a parent cancels its unfinished children.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from pydantic import BaseModel

import durable

app = durable.App()


class Photo(BaseModel):
    album: str
    name: str
    megapixels: int


async def resize(photo: Photo) -> int:
    await asyncio.sleep(0.01)  # the image work
    return photo.megapixels * 1000 // 4


@app.function(name="resize_photo", concurrency=20)
async def resize_photo(ctx: durable.Context, photo: Photo) -> int:
    return await ctx.step("resize", resize, photo)


@app.function(name="develop_raw", queue="gpu")
async def develop_raw(ctx: durable.Context, photo: Photo) -> int:
    return await ctx.step("develop", resize, photo)


@app.function(name="publish_album")
async def publish_album(ctx: durable.Context, photos: list[Photo]) -> int:
    """Process every photo in parallel (one child run each), keep the album embargoed for a
    day, and return the thumbnails' total size."""
    raw = [photo for photo in photos if photo.name.endswith(".raw")]
    jpeg = [photo for photo in photos if photo not in raw]
    sizes = await asyncio.gather(
        *(ctx.run(resize_photo, photo) for photo in jpeg),
        *(ctx.run(develop_raw, photo) for photo in raw),
    )
    await ctx.sleep(timedelta(days=1))
    return sum(sizes)


async def waiting(album: durable.RunHandle[int], children: int) -> None:
    """Until the album run is suspended with all its children started."""
    while (await album.status()) != "suspended" or len(await album.children()) < children:  # noqa: ASYNC110 (the database changes, not this process)
        await asyncio.sleep(0.05)


async def main() -> dict[str, list[str]]:
    summer = [Photo(album="summer", name=f"img-{i}.jpg", megapixels=12 + i % 4) for i in range(50)]
    studio = [Photo(album="studio", name=f"img-{i}.raw", megapixels=40) for i in range(10)]
    async with app:
        worker = asyncio.create_task(app.run_worker(concurrency=25))  # no worker serves "gpu"
        first = await app.start(publish_album, summer)
        second = await app.start(publish_album, studio)
        await waiting(first, 50)
        while any(c.status != "completed" for c in await first.children()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        done = sum(child.result for child in await first.children())
        print(f"summer: 50 photos resized by child runs, {done} KB of thumbnails; embargoed")
        await waiting(second, 10)
        for album, name in ((first, "summer"), (second, "studio")):
            outcome = await album.cancel("the album was withdrawn")
            print(f"{name}: {outcome}")
        statuses = {
            "summer": sorted({str(c.status) for c in await first.children()}),
            "studio": sorted({str(c.status) for c in await second.children()}),
        }
        app.stop_workers()
        await worker
    print(f"children: {statuses}")
    return statuses


if __name__ == "__main__":
    asyncio.run(main())
