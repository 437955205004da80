// The chat page's script (chat.html): durablefetch's "Quick start with AI SDK" recipe, with the
// AI SDK's own Chat machinery (AbstractChat, which useChat wraps for React) in a plain page.
// Bundled for the browser by esbuild (tests/proxy/test_chat_browser.py builds it).
//
// As in the recipe: the chat's endpoint has a URL of its own (?chatId=), the transport's fetch
// is durablefetch's, a new message first deletes what the proxy keeps for that URL, and after a
// reload, if the proxy says the answer is still in progress, the page sends the last message
// again: the proxy joins it to the running answer instead of calling the upstream again.
import { AbstractChat, DefaultChatTransport } from 'ai'
import { DurableFetchClient } from 'durablefetch'

const durablefetchHost = document.querySelector('meta[name="durablefetch-host"]').content
const df = new DurableFetchClient({ durablefetchHost })
const chatId = new URLSearchParams(location.search).get('chat')
const api = `/api/chat?chatId=${chatId}`

// The Chat's state for a plain page (what @ai-sdk/react's ReactChatState does for React):
// the messages and the status, re-rendered on every change.
class PageChatState {
    #messages = []
    #status = 'ready'
    error = undefined

    constructor(onChange) {
        this.onChange = onChange
    }
    get status() {
        return this.#status
    }
    set status(status) {
        this.#status = status
        this.onChange()
    }
    get messages() {
        return this.#messages
    }
    set messages(messages) {
        this.#messages = [...messages]
        this.onChange()
    }
    pushMessage = (message) => {
        this.#messages = this.#messages.concat(message)
        this.onChange()
    }
    popMessage = () => {
        this.#messages = this.#messages.slice(0, -1)
        this.onChange()
    }
    replaceMessage = (index, message) => {
        this.#messages = [
            ...this.#messages.slice(0, index),
            this.snapshot(message),
            ...this.#messages.slice(index + 1),
        ]
        this.onChange()
    }
    snapshot = (thing) => structuredClone(thing)
}

class PageChat extends AbstractChat {
    constructor(init) {
        super({ ...init, state: new PageChatState(() => render(this)) })
    }
}

const chat = new PageChat({
    id: chatId,
    transport: new DefaultChatTransport({ api, fetch: df.fetch }),
})

const log = document.getElementById('log')
const STATES = { submitted: 'streaming', streaming: 'streaming', ready: 'done', error: 'failed' }

function render(chat) {
    log.replaceChildren(
        ...chat.messages.map((message) => {
            const turn = document.createElement('div')
            turn.className = `turn ${message.role}`
            const text = message.parts
                .filter((part) => part.type === 'text')
                .map((part) => part.text)
                .join('')
            turn.innerHTML = '<div class="role"></div><div class="text"></div>'
            turn.querySelector('.role').textContent = message.role
            turn.querySelector('.text').textContent = text
            if (message.role === 'assistant') turn.dataset.state = STATES[chat.status]
            return turn
        }),
    )
    document.body.dataset.status = chat.status
    if (chat.error) document.body.dataset.error = chat.error.message
}

// If an answer is in progress (a reload mid-answer), send the message again: it resumes.
df.isInProgress(api)
    .then(({ inProgress }) => {
        document.body.dataset.checked = 'true'
        if (inProgress) {
            document.body.dataset.resumed = 'true'
            const text = localStorage.getItem('lastMessage') || ''
            return chat.sendMessage({ text })
        }
    })
    .catch((error) => {
        document.body.dataset.error = String(error)
    })

document.getElementById('form').addEventListener('submit', async (event) => {
    event.preventDefault()
    const form = event.currentTarget
    const message = new FormData(form).get('message')
    await df.delete(api) // clear the proxy's state so the new message makes a new request
    chat.sendMessage({ text: message })
    localStorage.setItem('lastMessage', message)
    form.reset()
})
