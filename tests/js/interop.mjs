// The official automerge-repo client as a fieldsync peer. Run by tests/it/js_client.rs:
//
//   node tests/js/interop.mjs <ws-url-with-?token=> [--capture DIR | --b-url URL | --pause]
//
// With --b-url, client B talks to that URL instead (another fieldsync node on the same
// database, with its own token): the edits then meet only through the nodes' database.
// With --pause, only client A runs, beside a peer of the test's own (a Rust device on
// another node): A creates the household, prints `{"url"}` once the server holds it, goes
// offline and records a visit, waits for a line on stdin (the other peer has made its own
// offline edit), comes back, and prints what it has once it holds both visits.
// First, without a token, the same WebSocket library the stock adapter uses is refused with
// HTTP 401 before any upgrade (reported as `noTokenStatus`); then the run goes on with the
// token in the URL, which is how the stock client authenticates (it cannot set headers).
//
// Client A creates a household and waits until the server holds it; a fresh client B finds
// it by URL; both go offline, edit the same household (each adds a visit, both set
// `premises` differently), come back online and sync. Prints one JSON line with what each
// client saw. With --capture, client A talks through a recording proxy that writes every
// frame (both directions) to DIR, to refresh tests/fixtures/js-frames.
import { Repo, cbor, generateAutomergeUrl } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import * as Automerge from "@automerge/automerge"
import { WebSocketServer, WebSocket } from "ws"
import { mkdirSync, writeFileSync } from "node:fs"
import { join } from "node:path"

const [url, flag, flagValue] = process.argv.slice(2)
const captureDir = flag === "--capture" ? flagValue : undefined
const urlB = flag === "--b-url" ? flagValue : url
if (!url) {
  console.error("usage: node interop.mjs <ws-url> [--capture DIR | --b-url URL | --pause]")
  process.exit(2)
}
const deadline = setTimeout(() => {
  console.error("interop: timed out after 60 s")
  process.exit(1)
}, 60_000)

// Resolves when the server (a remote with a storage id) reports heads equal to ours.
function whenHeld(repo, handle) {
  return new Promise(resolve => {
    const same = heads => JSON.stringify([...(heads ?? [])].sort()) === JSON.stringify([...handle.heads()].sort())
    const held = () =>
      Object.values(repo.peerMetadataByPeerId)
        .map(m => m.storageId)
        .filter(Boolean)
        .some(storageId => same(handle.getSyncInfo(storageId)?.lastHeads))
    if (held()) return resolve()
    const onRemote = () => {
      if (held()) {
        handle.off("remote-heads", onRemote)
        resolve()
      }
    }
    handle.on("remote-heads", onRemote)
  })
}

function whenDoc(handle, predicate) {
  return new Promise(resolve => {
    if (predicate(handle.doc())) return resolve(handle.doc())
    const onChange = () => {
      if (predicate(handle.doc())) {
        handle.off("change", onChange)
        resolve(handle.doc())
      }
    }
    handle.on("change", onChange)
  })
}

async function recordingProxy(upstream, dir) {
  mkdirSync(dir, { recursive: true })
  let n = 0
  const save = (direction, data) => {
    const bytes = new Uint8Array(data)
    const type = cbor.decode(bytes).type
    n += 1
    writeFileSync(join(dir, `${String(n).padStart(2, "0")}-${direction}-${type}.cbor`), bytes)
  }
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0 })
  await new Promise(r => server.on("listening", r))
  server.on("connection", client => {
    const up = new WebSocket(upstream)
    const queue = []
    up.on("open", () => queue.splice(0).forEach(m => up.send(m)))
    client.on("message", data => {
      save("client", data)
      up.readyState === WebSocket.OPEN ? up.send(data) : queue.push(data)
    })
    up.on("message", data => {
      save("server", data)
      client.send(data)
    })
    client.on("close", () => up.close())
    up.on("close", () => client.close())
  })
  return { url: `ws://127.0.0.1:${server.address().port}`, close: () => server.close() }
}

// Without a token: refused before the upgrade.
const noTokenStatus = await new Promise(resolve => {
  const bare = new URL(url)
  bare.searchParams.delete("token")
  const ws = new WebSocket(bare.toString())
  ws.on("unexpected-response", (_req, res) => {
    let body = ""
    res.on("data", chunk => (body += chunk))
    res.on("end", () => resolve({ status: res.statusCode, body: JSON.parse(body) }))
  })
  ws.on("open", () => resolve({ status: 101 }))
  ws.on("error", () => {})
})

const proxy = flag === "--capture" ? await recordingProxy(url, captureDir) : null
const adapterA = new WebSocketClientAdapter(proxy ? proxy.url : url, 100)
const adapterB = new WebSocketClientAdapter(urlB, 100)
const repoA = new Repo({ network: [adapterA], peerId: "js-officer-a" })
const repoB = new Repo({ network: [adapterB], peerId: "js-officer-b" })

const handleA = repoA.create({
  type: "household",
  schema: 1,
  station: "Zhongzheng Station",
  village: "Linsen",
  address: { township: "Zhongzheng", village: "Linsen", group: "3", street: "Linsen S. Rd", house_no: "18", landmark: "" },
  geo: {},
  premises: "home",
  members: {},
  visits: {},
  matters: {},
  follow_ups: {},
  review: { state: "received", approved_heads: [], comments: [] },
})
await whenHeld(repoA, handleA)

if (flag === "--pause") {
  console.log(JSON.stringify({ url: handleA.url }))
  adapterA.disconnect()
  const at = 1_790_000_000_000
  handleA.change(d => {
    d.visits["a0000000-0000-4000-8000-000000000001"] = {
      officer: "js-officer-a", device: "js-officer-a-phone", started_at: new Date(at),
      ended_at: new Date(at + 600_000), outcome: "met", mode: "in_home", people_met: ["resident"],
      notes: "Recorded offline on the JS client.", publicity: ["anti_fraud"], security_score: 4,
      satisfaction: 5,
    }
  })
  await new Promise(resolve => process.stdin.once("data", resolve))
  adapterA.connect(repoA.peerId, adapterA.peerMetadata)
  const merged = await whenDoc(handleA, d => Object.keys(d.visits).length === 2)
  await whenHeld(repoA, handleA)
  console.log(JSON.stringify({
    url: handleA.url,
    headsA: Automerge.getHeads(merged),
    visitsA: Object.keys(merged.visits).sort(),
  }))
  clearTimeout(deadline)
  await repoA.shutdown()
  await repoB.shutdown()
  process.exit(0)
}

if (proxy) {
  // An ephemeral message, and a request for a document the server does not have.
  handleA.broadcast({ cursor: 3 })
  const missing = await repoA.find(generateAutomergeUrl()).catch(e => String(e))
  void missing
}

// A 60,000-character landmark of pseudo-random letters (about 35 KB even deflated): the
// document then reaches B in one message longer than the server's largest frame, which the
// server writes as a fragmented WebSocket message and the stock client must reassemble.
let seed = 7
const landmark = Array.from({ length: 60_000 }, () => {
  seed = (seed * 48271) % 2147483647
  return "abcdefghijklmnopqrstuvwxyz"[seed % 26]
}).join("")
handleA.change(d => { d.address.landmark = landmark })
await whenHeld(repoA, handleA)

const handleB = await repoB.find(handleA.url)
const seenByB = structuredClone(handleB.doc())

// Offline: both phones lose coverage and record a visit each; both correct `premises`.
adapterA.disconnect()
adapterB.disconnect()
const visit = (officer, notes, at) => ({
  officer, device: `${officer}-phone`, started_at: new Date(at), ended_at: new Date(at + 600_000),
  outcome: "met", mode: "in_home", people_met: ["resident"], notes, publicity: ["anti_fraud"],
  security_score: 4, satisfaction: 5,
})
handleA.change(d => {
  d.visits["a0000000-0000-4000-8000-000000000001"] = visit("js-officer-a", "Resident reports scooter theft.", 1_790_000_000_000)
  d.premises = "rental"
})
handleB.change(d => {
  d.visits["b0000000-0000-4000-8000-000000000002"] = visit("js-officer-b", "Neighbour dispute about parking.", 1_790_000_900_000)
  d.premises = "shop"
})

// Back in coverage.
adapterA.connect(repoA.peerId, adapterA.peerMetadata)
adapterB.connect(repoB.peerId, adapterB.peerMetadata)
const both = d => Object.keys(d.visits).length === 2
const mergedA = await whenDoc(handleA, both)
const mergedB = await whenDoc(handleB, both)
await Promise.all([whenHeld(repoA, handleA), whenHeld(repoB, handleB)])

console.log(JSON.stringify({
  noTokenStatus,
  url: handleA.url,
  seenByB,
  headsA: Automerge.getHeads(mergedA),
  headsB: Automerge.getHeads(mergedB),
  visitsA: Object.keys(mergedA.visits).sort(),
  premisesConflictsA: Object.values(Automerge.getConflicts(mergedA, "premises") ?? {}).map(String).sort(),
}))

if (proxy) {
  // Frames a JS encoder writes with float64 numbers (cbor-x encodes integers past 2^32 as
  // float64): a remote-heads-changed with a Date.now()-style timestamp, an ephemeral count.
  writeFileSync(join(captureDir, "90-client-remote-heads-changed-float.cbor"), cbor.encode({
    type: "remote-heads-changed", senderId: "js-officer-a", targetId: "server",
    documentId: handleA.documentId,
    newHeads: { "storage-1": { heads: handleA.heads(), timestamp: 1_790_000_000_123 } },
  }))
  writeFileSync(join(captureDir, "91-client-ephemeral-float.cbor"), cbor.encode({
    type: "ephemeral", senderId: "js-officer-a", targetId: "server", documentId: handleA.documentId,
    sessionId: "s", count: 2 ** 33, data: new Uint8Array([1, 2, 3]),
  }))
  proxy.close()
}
clearTimeout(deadline)
await repoA.shutdown()
await repoB.shutdown()
process.exit(0)
