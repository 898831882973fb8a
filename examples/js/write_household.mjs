// Writes a household that conforms to proto-docs/data-model.md with the stock
// @automerge/automerge-repo client, the way a phone app would, and waits until the server
// holds it. Run it against a server with an officer's device token:
//
//   npm install --prefix examples/js
//   node examples/js/write_household.mjs http://127.0.0.1:3030 fsd_...
//
// It asks the API who the token belongs to (station, villages), creates the household in
// one change with every container the schema names, records a visit with a matter, and
// prints one JSON line: {"url", "heads", "village"}. Strings are written the JS way
// (collaborative text), which the server accepts like scalar strings.
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { randomUUID } from "node:crypto"

const [base, token] = process.argv.slice(2)
if (!base || !token) {
  console.error("usage: node write_household.mjs <http://host:port> <device token>")
  process.exit(2)
}
const deadline = setTimeout(() => {
  console.error("write_household: the server did not confirm within 60 s; is it running?")
  process.exit(1)
}, 60_000)

// 1. Who am I? (station and villages decide what the server accepts)
const res = await fetch(`${base}/api/v1/me`, { headers: { authorization: `Bearer ${token}` } })
if (!res.ok) {
  console.error(`write_household: /api/v1/me answered ${res.status}: ${await res.text()}`)
  process.exit(1)
}
const me = await res.json()
const village = me.villages[0].name

// 2. Connect like any automerge-repo app; the token rides in the URL (browsers cannot set
// headers on a WebSocket).
const wsUrl = `${base.replace(/^http/, "ws")}/sync?token=${encodeURIComponent(token)}`
const repo = new Repo({ network: [new WebSocketClientAdapter(wsUrl)], peerId: `js-example-${randomUUID()}` })

// 3. The creating change makes every container (data-model.md, rule 1).
const handle = repo.create({
  type: "household",
  schema: 1,
  station: me.station,
  village,
  address: { township: "Zhongzheng", village, group: "5", street: "Nanhai Rd", house_no: "21", landmark: "opposite the temple" },
  geo: {},
  premises: "home",
  members: {},
  visits: {},
  matters: {},
  follow_ups: {},
  review: { state: "received", approved_heads: [], comments: [] },
})

// 4. A visit and what the resident raised, keyed by fresh UUIDs (rule 2).
const visitId = randomUUID()
const memberId = randomUUID()
handle.change(doc => {
  doc.members[memberId] = { name: "Lin Chun-hua", relation: "head", birth_year: 1958, phone: "02-2345-6789", flags: ["lives_alone"] }
  doc.visits[visitId] = {
    officer: me.user,
    device: "js-example",
    started_at: new Date(),
    ended_at: new Date(),
    outcome: "met",
    mode: "in_home",
    people_met: ["Lin Chun-hua"],
    notes: "Asked how to recognise fake investment calls; left the 165 leaflet.",
    publicity: ["anti_fraud"],
    security_score: 4,
    satisfaction: 5,
  }
  doc.matters[randomUUID()] = {
    visit: visitId,
    kind: "consultation",
    description: "Wants a call back about a suspicious investment group chat.",
    risk: "yellow",
    status: "new",
    actions: [],
    confidential: false,
  }
})

// 5. Held = the server (the peer with a storage id) reports our heads.
await new Promise(resolve => {
  const same = heads => JSON.stringify([...(heads ?? [])].sort()) === JSON.stringify([...handle.heads()].sort())
  const held = () =>
    Object.values(repo.peerMetadataByPeerId)
      .map(m => m.storageId)
      .filter(Boolean)
      .some(storageId => same(handle.getSyncInfo(storageId)?.lastHeads))
  if (held()) return resolve()
  const check = () => {
    if (held()) {
      handle.off("remote-heads", check)
      resolve()
    }
  }
  handle.on("remote-heads", check)
})

console.log(JSON.stringify({ url: handle.url, heads: handle.heads(), village }))
clearTimeout(deadline)
await repo.shutdown()
process.exit(0)
