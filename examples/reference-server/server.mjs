// The reference sync server, as automerge-repo's own sync-server sets it up: a Repo with
// file-system storage and the WebSocket server adapter, sharing nothing unasked
// (sharePolicy false). Usage: node server.mjs DATA_DIR [PORT]; prints "listening on PORT"
// once it accepts connections (PORT 0 picks a free one).
import os from "node:os"
import { WebSocketServer } from "ws"
import { Repo } from "@automerge/automerge-repo"
import { NodeWSServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

const [dir, port = "0"] = process.argv.slice(2)
if (!dir) {
  console.error("usage: node server.mjs DATA_DIR [PORT]")
  process.exit(2)
}
const wss = new WebSocketServer({ host: "127.0.0.1", port: Number(port), maxPayload: 64 * 1024 * 1024 })
new Repo({
  network: [new NodeWSServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(dir),
  peerId: `storage-server-${os.hostname()}`,
  sharePolicy: async () => false,
})
wss.on("listening", () => console.log(`listening on ${wss.address().port}`))
const stop = () => { wss.close(); process.exit(0) }
process.on("SIGTERM", stop)
process.on("SIGINT", stop)
